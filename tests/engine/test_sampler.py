"""The sampler: upstream order, greedy cases, seeded reproducibility, repetition penalty, filters,
parameter validation and the sampling record."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.errors import InputError, NonFiniteError, SamplingError
from engine.sampler import Sampler, SamplingParams

V = 50
PURE = dict(top_k=0, top_p=1.0, min_p=0.0)  # no filters: the whole tempered distribution


def random_logits(seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def from_probs(probs) -> np.ndarray:
    """Logits whose softmax is `probs` (padded with near-zero probabilities up to V)."""
    p = np.full(V, 1e-12)
    p[: len(probs)] = probs
    return np.log(p).astype(np.float32)


def draws(params: SamplingParams, n=40) -> list[int]:
    s = Sampler(params, V)
    return [s.sample(random_logits(i), [])[0] for i in range(n)]


def stage(record, name):
    return next(st for st in record.stages if st.name == name)


# --- greedy -------------------------------------------------------------------------------------------

def test_greedy_when_temperature_zero():
    s = Sampler(SamplingParams(temperature=0.0, seed=1, **PURE), V)
    for i in range(20):
        x = random_logits(i)
        token, rec = s.sample(x, [], record=True)
        assert token == int(np.argmax(x)) and rec.greedy
        assert rec.chosen_prob == pytest.approx(np.exp(x[token]) / np.exp(x.astype(np.float64)).sum())


def test_top_k_one_is_greedy():
    params = SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3)
    assert params.greedy
    s = Sampler(params, V)
    assert [s.sample(random_logits(i), [])[0] for i in range(20)] == [int(np.argmax(random_logits(i))) for i in range(20)]
    # the same temperature without top_k = 1 does not pick the argmax every time
    assert draws(SamplingParams(temperature=5.0, seed=3, **PURE), 20) != [int(np.argmax(random_logits(i))) for i in range(20)]


def test_greedy_uses_the_penalised_logits():
    x = np.zeros(V, np.float32)
    x[4], x[5] = 2.0, 1.5
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0), V)
    assert s.sample(x, [])[0] == 4 and s.sample(x, [4])[0] == 5


def test_tiny_temperature_does_not_overflow():
    x = random_logits(7)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        token, rec = Sampler(SamplingParams(temperature=1e-300, seed=0, **PURE), V).sample(x, [], record=True)
    assert token == int(np.argmax(x)) and rec.chosen_prob == 1.0
    assert json.dumps(rec.to_dict(), allow_nan=False)


# --- seeds --------------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.5, seed=42, **PURE)
    first = draws(params)
    assert first == draws(params)
    assert first != [int(np.argmax(random_logits(i))) for i in range(40)]  # it really sampled


def test_different_seeds_diverge():
    base = dict(temperature=1.5, **PURE)
    assert draws(SamplingParams(seed=1, **base)) != draws(SamplingParams(seed=2, **base))


def test_draws_follow_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, seed=5, **PURE), V)
    x = from_probs([0.5, 0.3, 0.2])
    counts = np.bincount([s.sample(x, [])[0] for _ in range(6000)], minlength=V)
    assert np.allclose(counts[:3] / 6000, [0.5, 0.3, 0.2], atol=0.025) and counts[3:].sum() == 0


# --- repetition penalty ---------------------------------------------------------------------------------

def test_repeat_penalty_one_is_noop():
    x = random_logits()
    s = Sampler(SamplingParams(repeat_penalty=1.0, repeat_last_n=-1), V)
    assert np.array_equal(s.penalize(x, list(range(V))), x)
    params = SamplingParams(temperature=1.0, repeat_penalty=1.0, seed=9, **PURE)
    with_history, without = Sampler(params, V), Sampler(params, V)
    for i in range(20):
        assert with_history.sample(random_logits(i), list(range(V)))[0] == without.sample(random_logits(i), [])[0]


def test_repeat_penalty_divides_positive_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=64), V)
    x = np.zeros(V, np.float32)
    x[7] = 3.0
    out = s.penalize(x, [7, 7, 7])
    assert out[7] == pytest.approx(1.5)  # each distinct token once, however often it repeats
    assert np.array_equal(np.delete(out, 7), np.delete(x, 7))


def test_repeat_penalty_multiplies_negative_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=64), V)
    x = np.zeros(V, np.float32)
    x[9], x[10] = -3.0, 0.0
    out = s.penalize(x, [9, 10])
    assert out[9] == pytest.approx(-6.0) and out[10] == 0.0


def test_repeat_penalty_window_bound():
    x = np.full(V, 4.0, np.float32)
    out = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2), V).penalize(x, [1, 2, 3])
    assert out[1] == 4.0 and out[2] == 2.0 and out[3] == 2.0  # only the last two are in the window
    whole = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=-1), V).penalize(x, [1, 2, 3])
    assert whole[1] == whole[2] == whole[3] == 2.0 and whole[0] == 4.0


def test_repeat_last_n_zero_is_noop():
    x = random_logits()
    assert np.array_equal(Sampler(SamplingParams(repeat_penalty=3.0, repeat_last_n=0), V).penalize(x, [1, 2, 3]), x)
    assert not np.array_equal(Sampler(SamplingParams(repeat_penalty=3.0, repeat_last_n=1), V).penalize(x, [1, 2, 3]), x)


@pytest.mark.parametrize("history", [[-1], [V], [1, 2, 10**9]])
def test_history_ids_out_of_range_are_refused(history):
    with pytest.raises(InputError):
        Sampler(SamplingParams(repeat_penalty=1.5), V).sample(random_logits(), history)


# --- filters ----------------------------------------------------------------------------------------------

def test_top_k_limits_candidates():
    s = Sampler(SamplingParams(temperature=3.0, top_k=3, top_p=1.0, min_p=0.0, seed=0), V)
    x = random_logits(5)
    best = set(np.argsort(-x)[:3].tolist())
    assert {s.sample(x, [])[0] for _ in range(300)} == best


@pytest.mark.parametrize("top_p, kept", [(0.4, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, V)])
def test_top_p_keeps_smallest_nucleus(top_p, kept):
    x = from_probs([0.5, 0.35, 0.1, 0.05])  # cumulative 0.5, 0.85, 0.95, 1.0
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0, seed=0), V)
    assert stage(s.sample(x, [], record=True)[1], "top_p").candidates == kept
    picks = {s.sample(x, [])[0] for _ in range(400)}
    assert picks == set(range(min(kept, 4)))


def test_min_p_filters_relative_to_max():
    x = from_probs([0.4, 0.3, 0.2, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.6, seed=0), V)
    assert stage(s.sample(x, [], record=True)[1], "min_p").candidates == 2  # 0.2 < 0.6 * 0.4 <= 0.3
    assert {s.sample(x, [])[0] for _ in range(300)} == {0, 1}
    loose = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0), V)
    assert {loose.sample(x, [])[0] for _ in range(600)} == {0, 1, 2, 3}


def test_temperature_applies_before_top_p():
    x = from_probs([0.6, 0.3, 0.1])  # at T = 1, top_p 0.7 keeps two tokens
    warm = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=0), V)
    cold = Sampler(SamplingParams(temperature=0.2, top_k=0, top_p=0.7, min_p=0.0, seed=0), V)
    assert stage(warm.sample(x, [], record=True)[1], "top_p").candidates == 2
    assert stage(cold.sample(x, [], record=True)[1], "top_p").candidates == 1  # sharper after temperature


def test_masked_tokens_are_never_drawn():
    x = np.zeros(V, np.float32)
    x[:45] = -np.inf
    s = Sampler(SamplingParams(temperature=2.0, seed=0, **PURE), V)
    assert {s.sample(x, [])[0] for _ in range(300)} == set(range(45, 50))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_refused(bad):
    x = random_logits()
    x[3] = bad
    for params in (SamplingParams(seed=0), SamplingParams(temperature=0.0)):
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            Sampler(params, V).sample(x, [])
    with pytest.raises(NonFiniteError):
        Sampler(SamplingParams(seed=0), V).sample(np.full(V, -np.inf, np.float32), [])


def test_logits_of_the_wrong_shape_are_refused():
    with pytest.raises(SamplingError, match="shape"):
        Sampler(SamplingParams(), V).sample(np.zeros(V + 1, np.float32), [])


# --- parameters -------------------------------------------------------------------------------------------

BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("temperature", None), ("temperature", True),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("top_k", "40"),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", None),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", "0.1"),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", float("inf")), ("repeat_penalty", False),
    ("repeat_last_n", -2), ("repeat_last_n", 1.5), ("repeat_last_n", None),
    ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", None),
    ("seed", -5), ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("stop", "\n"), ("stop", ("",)), ("stop", (3,)), ("stop", None),
]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_params_rejected(name, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{name: value})
    assert name in str(e.value) and "\n" not in str(e.value)


def test_valid_edge_params_are_accepted_and_normalised():
    p = SamplingParams(temperature=np.float32(0.5), top_k=40.0, top_p=1, min_p=0, repeat_penalty=1,
                       repeat_last_n=-1, seed=np.int64(3), max_tokens=0, stop=["\n\n"])
    assert (type(p.temperature), type(p.top_k), type(p.top_p), type(p.seed)) == (float, int, float, int)
    assert p.stop == ("\n\n",) and p.top_k == 40 and not p.greedy
    assert json.dumps(Sampler(p, V).sample(random_logits(), [1], record=True)[1].to_dict(), allow_nan=False)


@pytest.mark.parametrize("vocab_size", [0, -3, 2.5, True])
def test_sampler_refuses_a_bad_vocab_size(vocab_size):
    with pytest.raises(SamplingError):
        Sampler(SamplingParams(), vocab_size)


# --- the record -----------------------------------------------------------------------------------------

def test_sampling_record_stages():
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repeat_penalty=1.3, seed=4)
    x = random_logits(2)
    history = [int(np.argmax(x))]
    token, rec = Sampler(params, V).sample(x, history, record=True)
    d = rec.to_dict()
    json.dumps(d, allow_nan=False)
    assert [st["name"] for st in d["stages"]] == ["raw", "repeat_penalty", "temperature", "top_k", "top_p", "min_p"]
    assert [st["value"] for st in d["stages"]] == ["logit"] * 3 + ["prob"] * 3
    counts = [st["candidates"] for st in d["stages"]]
    assert counts[:3] == [V, V, V] and counts[3] == 10 and counts[3] >= counts[4] >= counts[5] >= 1
    raw = d["stages"][0]["top"]
    assert [t for t, _ in raw] == np.argsort(-x, kind="stable")[:10].tolist()
    assert raw[0][1] == pytest.approx(float(x.max()))
    penalised = dict(d["stages"][1]["top"])
    assert history[0] not in penalised or penalised[history[0]] == pytest.approx(x.max() / 1.3)
    tempered = d["stages"][2]["top"]
    assert tempered[0][1] == pytest.approx(d["stages"][1]["top"][0][1] / 0.7)
    last = d["stages"][-1]["top"]
    assert sum(p for _, p in last) == pytest.approx(1.0) or counts[5] > 10
    assert d["chosen"] == token and token in [t for t, _ in last]
    assert d["chosen_prob"] == pytest.approx(dict(last)[token]) and d["chosen_logit"] == pytest.approx(float(x[token]))
    assert d["params"]["top_k"] == 10 and d["params"]["seed"] == 4 and d["greedy"] is False


def test_no_record_unless_asked():
    assert Sampler(SamplingParams(seed=0), V).sample(random_logits(), [])[1] is None


def test_greedy_record_has_the_stages_that_ran():
    token, rec = Sampler(SamplingParams(temperature=0.0), V).sample(random_logits(1), [], record=True)
    assert [st.name for st in rec.stages] == ["raw", "repeat_penalty"] and rec.greedy and rec.chosen == token
    assert 0 < rec.chosen_prob <= 1 and not math.isnan(rec.chosen_prob)
