"""Generation: streaming, stopping, seeded reproducibility, the per-step sampling record."""

from __future__ import annotations

import numpy as np

from engine.generate import Generation, generate
from engine.sampler import SamplingParams

PROMPT = [5, 17, 42, 99, 3, 250]


def run(model, params, **kw):
    res = Generation(prompt_ids=PROMPT)
    steps = list(generate(model, PROMPT, params, result=res, **kw))
    return steps, res


def test_seeded_generation_is_reproducible(tiny_model):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, max_tokens=12)
    a, _ = run(tiny_model, params)
    b, _ = run(tiny_model, params)
    assert [s.token_id for s in a] == [s.token_id for s in b]
    assert len(a) >= 1


def test_different_seeds_give_different_generations(tiny_model):
    base = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16)
    runs = {tuple(s.token_id for s in run(tiny_model, SamplingParams(seed=seed, **base))[0]) for seed in range(4)}
    assert len(runs) > 1


def test_generation_yields_per_token(tiny_model):
    params = SamplingParams(temperature=0.0, max_tokens=6)
    gen = generate(tiny_model, PROMPT, params)
    first = next(gen)  # a token is available before the generation is over
    assert first.index == 0 and first.position == len(PROMPT)
    rest = list(gen)
    steps = [first] + rest
    assert [s.index for s in steps] == list(range(len(steps)))
    assert [s.position for s in steps] == [len(PROMPT) + i for i in range(len(steps))]
    assert all(s.finish is None for s in ([first] + rest)[:-1])


def test_closing_the_generator_stops_early(tiny_model):
    params = SamplingParams(temperature=0.0, max_tokens=50)
    res = Generation(prompt_ids=PROMPT)
    gen = generate(tiny_model, PROMPT, params, result=res)
    for i, _ in enumerate(gen):
        if i == 2:
            break
    gen.close()
    assert len(res.token_ids) == 3


def test_greedy_generation_matches_argmax_of_forward(tiny_model):
    from engine.forward import forward
    from engine.kv_cache import KVCache

    steps, res = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=5))
    seq = list(PROMPT)
    for s in steps:
        logits = forward(tiny_model, np.array(seq), KVCache(tiny_model.config, len(seq)))[-1]
        assert s.token_id == int(np.argmax(logits))
        seq.append(s.token_id)


def test_max_tokens_bounds_the_generation(tiny_model):
    steps, res = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=3))
    assert len(steps) <= 3
    if len(steps) == 3:
        assert res.finish in ("max_tokens", "stop_token", "stop_string")


def test_stop_token_ends_generation(tiny_model):
    greedy, _ = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=6))
    ids = [s.token_id for s in greedy]
    stop_at = 3 if len(ids) > 3 else len(ids) - 1
    # declare the greedy continuation's 4th token a stop token: generation must end right there
    steps, res = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=6), stop_token_ids={ids[stop_at]})
    got = [s.token_id for s in steps]
    assert got == ids[: ids.index(ids[stop_at]) + 1]
    assert res.finish == "stop_token" and steps[-1].finish == "stop_token"


def test_stop_string_ends_generation(tiny_model):
    tok = tiny_model.tokenizer
    greedy, _ = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=8))
    ids = [s.token_id for s in greedy]
    text = tok.decode(ids)
    target = next(i for i in range(1, len(ids) + 1) if tok.decode(ids[:i]).strip())
    stop = tok.decode(ids[:target]).strip()[-1]
    steps, res = run(tiny_model, SamplingParams(temperature=0.0, max_tokens=8, stop=(stop,)))
    assert res.finish == "stop_string"
    assert stop in tok.decode(res.token_ids) and len(steps) <= target
    assert text.startswith(tok.decode(res.token_ids))


def test_sampling_record_per_step(tiny_model):
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, seed=1, max_tokens=3)
    steps = list(generate(tiny_model, PROMPT, params, record_sampling=True))
    assert steps and all(s.record is not None for s in steps)
    for s in steps:
        d = s.record.to_dict()
        assert d["chosen"] == s.token_id or d.get("chosen", {}) == s.token_id or s.token_id in str(d)
