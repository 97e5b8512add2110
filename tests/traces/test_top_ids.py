"""The trace's top-k of the logits equals a stable descending sort (ties by lower id), without sorting the
whole vocabulary each step."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from traces.recorder import top_ids

VALUES = st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, np.nan, np.inf, -np.inf])


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=VALUES), st.integers(1, 45))
def test_top_ids_is_the_stable_descending_argsort(row, k):
    want = np.argsort(-row, kind="stable")[:k]
    assert np.array_equal(top_ids(row, k), want)


def test_top_ids_on_a_vocabulary_sized_row():
    row = np.random.default_rng(0).standard_normal(151936).astype(np.float32)
    row[[5, 70000, 151935]] = row.max() + 1  # a three-way tie for first: lower ids first
    assert np.array_equal(top_ids(row, 20), np.argsort(-row, kind="stable")[:20])
    assert list(top_ids(row, 3)) == [5, 70000, 151935]


def numpy_softmax_probs(row: np.ndarray) -> np.ndarray:
    """The whole-vocabulary softmax, written out in numpy (the max over finite values, NaN left out of the sum)."""
    finite = row[np.isfinite(row)]
    if not finite.size:
        return np.full_like(row, np.nan)
    with np.errstate(invalid="ignore"):
        e = np.exp((row - finite.max()).astype(np.float64))
        return (e / np.nansum(e)).astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=VALUES))
def test_recorded_top_probabilities_are_the_whole_row_softmax(row):
    """The recorder evaluates the softmax at the top-k ids only; it must be the full softmax there, NaN, Inf
    and rows without a finite value included."""
    from traces.recorder import TraceRecorder

    rec = TraceRecorder(top_k=5)
    rec.logits([0], row[None])
    got = rec.logits_records[0]
    want = numpy_softmax_probs(row)[got.top_ids]
    np.testing.assert_allclose(got.top_probs, want, rtol=1e-6, atol=0)
    assert np.array_equal(np.isnan(got.top_probs), np.isnan(want))
