"""The sampler: upstream order, greedy fallbacks, seeded reproducibility, repetition penalty, validation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import NonFiniteError, SamplingError
from engine.sampler import Sampler, SamplingParams

V = 50


def logits(seed=0):
    return np.random.default_rng(seed).standard_normal(V).astype(np.float32) * 3


def draws(params, n=30, seed_logits=0):
    s = Sampler(params, V)
    return [s.sample(logits(seed_logits + i), [])[0] for i in range(n)]


def test_greedy_when_temperature_zero():
    s = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), V)
    for i in range(10):
        x = logits(i)
        assert s.sample(x, [])[0] == int(np.argmax(x))


def test_top_k_one_is_greedy():
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3), V)
    for i in range(10):
        x = logits(i)
        assert s.sample(x, [])[0] == int(np.argmax(x))


def test_seeded_sampling_is_reproducible():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    assert draws(p) == draws(p)


def test_different_seeds_diverge():
    base = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    assert draws(SamplingParams(seed=1, **base)) != draws(SamplingParams(seed=2, **base))


def test_repeat_penalty_one_is_noop():
    s = Sampler(SamplingParams(repeat_penalty=1.0), V)
    x = logits()
    assert np.array_equal(s.penalize(x, list(range(V))), x)


def test_repeat_penalty_divides_positive_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=64), V)
    x = np.zeros(V, np.float32)
    x[7] = 3.0
    out = s.penalize(x, [7, 7, 7])
    assert out[7] == pytest.approx(1.5)  # each token once, however often it repeats
    assert np.array_equal(np.delete(out, 7), np.delete(x, 7))


def test_repeat_penalty_multiplies_negative_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=64), V)
    x = np.zeros(V, np.float32)
    x[9] = -3.0
    assert s.penalize(x, [9])[9] == pytest.approx(-6.0)


def test_repeat_penalty_window_bound():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2), V)
    x = np.full(V, 4.0, np.float32)
    out = s.penalize(x, [1, 2, 3])  # only the last two (2, 3) are in the window
    assert out[1] == 4.0 and out[2] == 2.0 and out[3] == 2.0


def test_repeat_last_n_zero_is_noop():
    s = Sampler(SamplingParams(repeat_penalty=3.0, repeat_last_n=0), V)
    x = logits()
    assert np.array_equal(s.penalize(x, [1, 2, 3]), x)


def test_repeat_penalty_changes_the_greedy_choice():
    x = np.zeros(V, np.float32)
    x[4], x[5] = 2.0, 1.5
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0), V)
    assert s.sample(x, [])[0] == 4 and s.sample(x, [4])[0] == 5


def test_top_p_keeps_smallest_nucleus():
    x = np.log(np.array([0.5, 0.35, 0.1, 0.05] + [1e-9] * (V - 4), dtype=np.float64)).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=0), V)
    _, rec = s.sample(x, [], record=True)
    stage = next(st for st in rec.stages if st.name == "top_p")
    assert stage.candidates == 2  # 0.5 + 0.35 reaches 0.8; 0.5 alone does not
    picks = {s.sample(x, [])[0] for _ in range(200)}
    assert picks == {0, 1}


def test_min_p_filters_relative_to_max():
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1] + [1e-9] * (V - 4), dtype=np.float64)).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.6, seed=0), V)
    picks = {s.sample(x, [])[0] for _ in range(200)}
    assert picks == {0, 1}  # 0.2 < 0.6 * 0.4


def test_top_k_limits_candidates():
    s = Sampler(SamplingParams(temperature=2.0, top_k=3, top_p=1.0, min_p=0.0, seed=0), V)
    x = logits(5)
    best = set(np.argsort(-x)[:3].tolist())
    assert {s.sample(x, [])[0] for _ in range(200)} <= best


BAD = [("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"), ("top_k", -1), ("top_k", 2.5),
       ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repeat_penalty", 0.0),
       ("repeat_penalty", -1.0), ("repeat_last_n", -2), ("max_tokens", -1), ("seed", -5), ("top_k", True),
       ("temperature", None)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_params_rejected(name, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{name: value})
    assert name in str(e.value) and "\n" not in str(e.value)


def test_sampling_record_stages():
    s = Sampler(SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=4), V)
    token, rec = s.sample(logits(2), [1, 2], record=True)
    d = rec.to_dict()
    assert [st["name"] for st in d["stages"]] == ["raw", "repeat_penalty", "temperature", "top_k", "top_p", "min_p"]
    counts = [st["candidates"] for st in d["stages"]]
    assert counts[3] == 10 and counts[3] >= counts[4] >= counts[5] >= 1
    assert d["chosen"] == token and 0 < d["chosen_prob"] <= 1
    assert token in [t for t, _ in d["stages"][-1]["top"]]


def test_non_finite_logits_are_refused():
    x = logits()
    x[3] = np.nan
    with pytest.raises(NonFiniteError):
        Sampler(SamplingParams(seed=0), V).sample(x, [])
