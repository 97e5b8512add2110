"""Our block writer, proven by gguf-py's dequantize (never by a decoder of ours)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine.quantize import quantize, random_blocks

BLOCK_TYPES = [QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# relative RMS error bounds on gaussian data: small samples (one block) / a 64 x 1024 matrix
BOUNDS = {QT.F16: 5e-4, QT.BF16: 3e-3, QT.Q8_0: 8e-3, QT.Q6_K: 0.025, QT.Q5_K: 0.05, QT.Q4_K: 0.10}
TIGHT = {QT.F16: 3e-4, QT.BF16: 2e-3, QT.Q8_0: 6e-3, QT.Q6_K: 0.021, QT.Q5_K: 0.042, QT.Q4_K: 0.085}
LEVELS = {QT.Q8_0: 255, QT.Q4_K: 15, QT.Q5_K: 31, QT.Q6_K: 63}
BLOCK = {QT.Q8_0: 32, QT.Q4_K: 256, QT.Q5_K: 256, QT.Q6_K: 256}


def rel_rms(y, x) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, np.float64) - x) ** 2) / np.mean(np.asarray(x, np.float64) ** 2)))


def roundtrip(x: np.ndarray, qt: QT) -> np.ndarray:
    raw = quantize(x, qt)
    assert raw.dtype == np.uint8 and raw.shape[:-1] == x.shape[:-1]
    return np.asarray(dequantize(raw.reshape(-1, raw.shape[-1]), qt), np.float32).reshape(x.shape)


def gaussian(shape, seed=0, std=0.05):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


@pytest.mark.parametrize("qt", list(BOUNDS), ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (1, 768), (3, 768), (2, 4, 512)], ids=str)
def test_gguf_dequantizes_our_rows_within_the_error_bound(qt, shape):
    x = gaussian(shape, seed=sum(shape))
    err = rel_rms(roundtrip(x, qt), x)
    assert err < BOUNDS[qt], f"{qt.name}: relative RMS error {err:.4f}"


@pytest.mark.parametrize("qt", list(TIGHT), ids=lambda q: q.name)
def test_accuracy_on_a_matrix(qt):
    x = gaussian((64, 1024), seed=7)
    err = rel_rms(roundtrip(x, qt), x)
    assert err < TIGHT[qt], f"{qt.name}: relative RMS error {err:.4f}"


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_every_element_lands_in_its_own_place(qt):
    # a misplaced nibble, high bit or sub-block scale moves an element by about the block's range;
    # the writer's own error is at most one quantization step of the block
    x = gaussian((4, 768), seed=3) + np.linspace(-0.1, 0.1, 768, dtype=np.float32)
    y = roundtrip(x, qt)
    amax = np.abs(x.reshape(-1, BLOCK[qt])).max(axis=1, keepdims=True)  # (B, 1)
    err = np.abs(y - x).reshape(-1, BLOCK[qt])
    assert np.all(err <= 2 * amax / LEVELS[qt]), f"worst error {float((err / amax).max()):.4f} of the block absmax"


def test_f32_is_exact():
    x = gaussian((3, 5), seed=1)
    assert np.array_equal(roundtrip(x, QT.F32), x)


@pytest.mark.parametrize("qt", BLOCK_TYPES + [QT.F16, QT.BF16], ids=lambda q: q.name)
def test_zero_rows_stay_zero(qt):
    assert np.all(roundtrip(np.zeros((2, 256), np.float32), qt) == 0)


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("value", [0.25, -0.25, -3.0, 1e-3])
def test_constant_rows(qt, value):
    x = np.full((2, 256), value, np.float32)
    y = roundtrip(x, qt)
    assert np.abs(y - x).max() <= 2 * abs(value) / LEVELS[qt]


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_huge_dynamic_range_across_rows(qt):
    # each row has its own blocks, so each row keeps its own relative accuracy
    x = gaussian((3, 256), seed=5, std=1.0) * np.array([[1e-4], [1.0], [1e4]], np.float32)
    y = roundtrip(x, qt)
    for row in range(3):
        assert rel_rms(y[row], x[row]) < BOUNDS[qt], f"row {row}"


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_an_outlier_inside_a_block(qt):
    x = gaussian((1, 256), seed=2, std=1e-3)
    x[0, 5] = 50.0
    y = roundtrip(x, qt)
    assert abs(y[0, 5] - 50.0) < 50.0 * 2 / LEVELS[qt]
    assert rel_rms(y, x) < BOUNDS[qt]


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_tiny_blocks_are_never_worse_than_zeros(qt):
    # scales below the smallest f16 subnormal used to leave a stray min (error 2.5x the signal)
    for scale in (1e-7, 1e-6, 1e-5):
        x = gaussian((1, 256), seed=4, std=scale)
        y = roundtrip(x, qt)
        assert np.all(np.isfinite(y)) and rel_rms(y, x) <= 1.0, f"std {scale}"


def test_partial_block_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((2, 100), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((2, 48), np.float32), QT.Q8_0)


@pytest.mark.parametrize("bad, qt, match", [
    (np.nan, QT.Q4_K, "NaN"), (np.inf, QT.F32, "NaN"), (1e6, QT.F16, "F16"), (1e12, QT.Q4_K, "too large"),
    (1e12, QT.Q6_K, "too large"), (1e12, QT.Q8_0, "too large"),
])
def test_values_that_do_not_fit_are_refused(bad, qt, match):
    x = np.zeros((1, 256), np.float32)
    x[0, 3] = bad
    with pytest.raises(ValueError, match=match):
        quantize(x, qt)


def test_types_without_a_writer_are_refused():
    with pytest.raises(ValueError, match="no writer"):
        quantize(np.zeros((1, 32), np.float32), QT.Q4_0)


@pytest.mark.parametrize("qt", BLOCK_TYPES + [QT.F16, QT.BF16, QT.F32], ids=lambda q: q.name)
@pytest.mark.parametrize("std", [0.02, 1.0])
def test_random_blocks_are_valid_with_the_requested_std(qt, std):
    raw = random_blocks(qt, (2, 64, 512), np.random.default_rng(0), std=std)
    assert raw.dtype == np.uint8 and raw.shape == quantize(np.zeros((2, 64, 512), np.float32), qt).shape
    y = np.asarray(dequantize(raw.reshape(128, -1), qt))
    assert np.all(np.isfinite(y))
    assert 0.9 * std < y.std() < 1.1 * std
    assert abs(y.mean()) < 0.02 * std


def test_random_blocks_are_seeded():
    a = random_blocks(QT.Q6_K, (8, 256), np.random.default_rng(1))
    b = random_blocks(QT.Q6_K, (8, 256), np.random.default_rng(1))
    c = random_blocks(QT.Q6_K, (8, 256), np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
