"""The fused kernels against gguf-py's `dequantize` + numpy, on random blocks and odd shapes.

gguf-py is the oracle: no dequantization of ours is used to compute an expected value.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine import kernels as K
from engine.errors import UnsupportedTypeError
from engine.kernels.cpu import bf16_to_f32, f16_to_f32
from engine.quants import block_layout

BLOCK_TYPES = (QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
SLOW_TYPES = (QT.Q4_0, QT.IQ4_NL)
# where each format keeps its f16 scales: (offset, count) in the block
SCALE_FIELDS = {QT.Q8_0: ((0, 1),), QT.Q4_K: ((0, 2),), QT.Q5_K: ((0, 2),), QT.Q6_K: ((208, 1),),
                QT.Q4_0: ((0, 1),), QT.IQ4_NL: ((0, 1),)}


def random_weights(qt, rows, cols, rng, experts=None):
    """Raw bytes of rows x cols weights: random blocks with finite moderate f16 scales, or random floats."""
    lead = (rows,) if experts is None else (experts, rows)
    if qt == QT.F32:
        return rng.standard_normal(lead + (cols,)).astype(np.float32).view(np.uint8)
    if qt == QT.F16:
        return rng.standard_normal(lead + (cols,)).astype(np.float16).view(np.uint8)
    if qt == QT.BF16:
        f = rng.standard_normal(lead + (cols,)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    qk, nbytes = block_layout(qt)
    raw = rng.integers(0, 256, size=lead + (cols // qk, nbytes), dtype=np.uint8)
    for off, count in SCALE_FIELDS[qt]:
        d = rng.uniform(-0.02, 0.02, size=lead + (cols // qk, count)).astype(np.float16)
        raw[..., off:off + 2 * count] = d.view(np.uint8)
    return raw.reshape(lead + (-1,))


def oracle(qt, raw):
    """gguf-py's dequantize of the raw rows, float32."""
    shape = raw.shape
    flat = raw.reshape(-1, shape[-1])
    return np.asarray(dequantize(flat, qt), dtype=np.float32).reshape(shape[:-1] + (-1,))


def assert_dot_close(got, w, x):
    want = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), np.max(np.abs(got - want) / (mag + 1e-30))


SHAPES = [(1, 1), (3, 3), (17, 1), (33, 2)]  # (rows, blocks)


@pytest.mark.parametrize("qt", BLOCK_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows, blocks", SHAPES)
def test_matmul_and_matvec_match_gguf_dequantize(qt, rows, blocks):
    rng = np.random.default_rng(rows * 100 + blocks)
    qk = block_layout(qt)[0]
    cols = blocks * qk if qk > 1 else blocks * 16 + 1  # odd lengths for float types
    raw = random_weights(qt, rows, cols, rng)
    w = oracle(qt, raw)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    out = np.empty((5, rows), np.float32)
    K.matmul(qt, raw, x, out)
    assert_dot_close(out, w, x)
    for t in range(5):  # each prefill row is bit-identical to the decode matvec of that token
        one = np.empty(rows, np.float32)
        K.matvec(qt, raw, x[t], one)
        assert np.array_equal(one.view(np.uint32), out[t].view(np.uint32))


@pytest.mark.parametrize("qt", BLOCK_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n, per_slot", [(1, False), (1, True), (5, False), (5, True)])
def test_expert_matmul_matches_per_expert_products(qt, n, per_slot):
    rng = np.random.default_rng(n + 7 * per_slot)
    qk = block_layout(qt)[0]
    E, rows, k = 6, 9, 3
    cols = 2 * qk if qk > 1 else 45
    raw = random_weights(qt, rows, cols, rng, experts=E)
    w = oracle(qt, raw)
    sel = rng.integers(0, E, size=(n, k)).astype(np.int32)
    sel[0, 1] = sel[0, 0]  # a repeated expert id within one token
    x = rng.standard_normal((n, k if per_slot else 1, cols)).astype(np.float32)
    out = np.empty((n, k, rows), np.float32)
    K.expert_matmul(qt, raw, sel, x, out)
    for t in range(n):
        for j in range(k):
            xin = x[t, j if per_slot else 0]
            assert_dot_close(out[t, j][None], w[sel[t, j]], xin[None])
            single = np.empty(rows, np.float32)
            K.matvec(qt, np.ascontiguousarray(raw[sel[t, j]]), xin, single)
            assert np.array_equal(single.view(np.uint32), out[t, j].view(np.uint32))


@pytest.mark.parametrize("qt", BLOCK_TYPES + FLOAT_TYPES + SLOW_TYPES, ids=lambda q: q.name)
def test_get_rows_and_dequantize_rows_equal_gguf(qt):
    rng = np.random.default_rng(3)
    qk = block_layout(qt)[0]
    cols = 3 * qk if qk > 1 else 37
    raw = random_weights(qt, 11, cols, rng)
    w = oracle(qt, raw)
    ids = np.array([0, 10, 3, 3], dtype=np.int64)
    out = np.empty((4, cols), np.float32)
    K.get_rows(qt, raw, ids, out)
    assert np.array_equal(out, w[ids])
    assert np.array_equal(K.dequantize_rows(qt, raw, cols), w)


@pytest.mark.parametrize("qt", SLOW_TYPES, ids=lambda q: q.name)
def test_slow_path_types_through_matmul_and_experts(qt):
    rng = np.random.default_rng(5)
    qk = block_layout(qt)[0]
    raw = random_weights(qt, 70, 4 * qk, rng, experts=2)  # more rows than one slow-path chunk
    w = oracle(qt, raw)
    x = rng.standard_normal((2, 4 * qk)).astype(np.float32)
    out = np.empty((2, 70), np.float32)
    K.matmul(qt, np.ascontiguousarray(raw[1]), x, out)
    assert_dot_close(out, w[1], x)
    eo = np.empty((2, 2, 70), np.float32)
    K.expert_matmul(qt, raw, np.array([[1, 0], [0, 0]], np.int32), x[:, None, :], eo)
    assert_dot_close(eo[0, 0][None], w[1], x[:1])
    assert_dot_close(eo[1, 1][None], w[0], x[1:])


def test_unknown_type_is_refused():
    with pytest.raises(UnsupportedTypeError):
        K.matmul(12345, np.zeros((1, 4), np.uint8), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))


def test_read_only_memory_mapped_weights(tmp_path):
    rng = np.random.default_rng(9)
    raw = random_weights(QT.Q4_K, 8, 512, rng)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    assert not mm.flags.writeable
    x = rng.standard_normal((2, 512)).astype(np.float32)
    a, b = np.empty((2, 8), np.float32), np.empty((2, 8), np.float32)
    K.matmul(QT.Q4_K, mm, x, a)
    K.matmul(QT.Q4_K, raw, x, b)
    assert np.array_equal(a, b)


def test_f16_and_bf16_decoders_on_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    want16 = bits.view(np.float16).astype(np.float32)
    got16 = np.array([f16_to_f32(int(b)) for b in bits], dtype=np.float32)
    assert np.array_equal(np.isnan(got16), np.isnan(want16))
    fin = ~np.isnan(want16)
    assert np.array_equal(got16[fin], want16[fin])
    wantbf = (bits.astype(np.uint32) << 16).view(np.float32)
    gotbf = np.array([bf16_to_f32(int(b)) for b in bits], dtype=np.float32)
    fin = ~np.isnan(wantbf)
    assert np.array_equal(np.isnan(gotbf), np.isnan(wantbf)) and np.array_equal(gotbf[fin], wantbf[fin])


def test_activation_stats_match_numpy():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    x[2, 8] = -np.inf
    x[3, :10] = 0.0
    got = K.activation_stats(x)
    for i, row in enumerate(x.astype(np.float64)):
        f = row[np.isfinite(row)]
        want = [row.size, f.mean(), f.std(ddof=1), f.min(), f.max(), np.sqrt((f * f).sum()), np.abs(f).max(),
                np.isnan(row).sum(), np.isinf(row).sum(), (row == 0).sum()]
        assert np.allclose(got[i], want, rtol=1e-12, atol=1e-12), (i, got[i], want)
    one = K.activation_stats(x[0])
    assert one.shape == (10,) and np.array_equal(one, got[0])
    allbad = K.activation_stats(np.array([np.nan, np.inf], np.float32))
    assert allbad[7] == 1 and allbad[8] == 1 and np.isnan(allbad[1]) and np.isnan(allbad[2])
