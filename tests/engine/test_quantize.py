"""Our block writer, proven by gguf-py's dequantize (never by a decoder of ours)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine.quantize import quantize, random_blocks

# relative RMS error bounds for gaussian data with our simple scale search
BOUNDS = {QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 1e-2, QT.Q6_K: 4e-2, QT.Q5_K: 6e-2, QT.Q4_K: 0.12}


def rel_rms(y, x):
    return float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))


@pytest.mark.parametrize("qt", list(BOUNDS), ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1, 256), (3, 768), (2, 4, 512)])
def test_gguf_dequantizes_our_blocks(qt, shape):
    x = (np.random.default_rng(hash(shape) % 2**32).standard_normal(shape) * 0.05).astype(np.float32)
    raw = quantize(x, qt)
    assert raw.dtype == np.uint8 and raw.shape[:-1] == shape[:-1]
    y = np.asarray(dequantize(raw.reshape(-1, raw.shape[-1]), qt)).reshape(shape)
    err = rel_rms(y, x)
    assert err < BOUNDS[qt], f"{qt.name}: relative RMS error {err:.4f}"


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("kind", ["zeros", "constant", "dynamic"])
def test_edge_rows(qt, kind):
    x = {"zeros": np.zeros((2, 256)), "constant": np.full((2, 256), 0.25),
         "dynamic": np.concatenate([np.full((1, 256), 1e-4), np.full((1, 256), 50.0)]) *
         np.sign(np.random.default_rng(1).standard_normal((2, 256)))}[kind].astype(np.float32)
    y = np.asarray(dequantize(quantize(x, qt), qt))
    assert np.all(np.isfinite(y))
    if kind == "zeros":
        assert np.all(y == 0)
    else:
        assert rel_rms(y, x) < BOUNDS[qt]


def test_partial_block_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((2, 100), np.float32), QT.Q4_K)


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.F16], ids=lambda q: q.name)
def test_random_blocks_are_valid_with_the_requested_std(qt):
    raw = random_blocks(qt, (64, 512), np.random.default_rng(0), std=0.02)
    y = np.asarray(dequantize(raw, qt))
    assert np.all(np.isfinite(y))
    assert 0.014 < y.std() < 0.026 and abs(y.mean()) < 0.005
