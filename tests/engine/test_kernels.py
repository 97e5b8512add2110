"""The quantized CPU kernels against gguf-py's `dequantize` + numpy, on random blocks and odd shapes.

gguf-py is the oracle: no dequantization of ours computes an expected value. Weights are random
bytes with the f16 scale fields overwritten by finite moderate values, so every product is finite.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from engine import kernels as K
from engine.errors import UnsupportedTypeError
from engine.kernels import cpu
from engine.quants import block_layout

BLOCK_TYPES = (QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
FAST_TYPES = FLOAT_TYPES + BLOCK_TYPES
SLOW_TYPES = (QT.Q4_0, QT.IQ4_NL)  # no fast kernel: gguf-py dequantizes them
# where each block format keeps its f16 scales: (byte offset, number of consecutive f16 fields)
SCALE_FIELDS = {QT.Q8_0: (0, 1), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, 1), QT.Q4_0: (0, 1),
                QT.IQ4_NL: (0, 1)}
name = lambda q: q.name  # noqa: E731  (pytest ids)


def random_weights(qt, lead, cols, rng):
    """Raw GGUF bytes of lead + (cols,) weights, shaped lead + (row_bytes,)."""
    if qt == QT.F32:
        return rng.standard_normal(lead + (cols,)).astype(np.float32).view(np.uint8)
    if qt == QT.F16:
        return rng.standard_normal(lead + (cols,)).astype(np.float16).view(np.uint8)
    if qt == QT.BF16:
        f = rng.standard_normal(lead + (cols,)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    qk, nbytes = block_layout(qt)
    raw = rng.integers(0, 256, size=lead + (cols // qk, nbytes), dtype=np.uint8)
    off, count = SCALE_FIELDS[qt]
    scales = rng.uniform(-0.05, 0.05, size=lead + (cols // qk, count)).astype(np.float16)
    raw[..., off:off + 2 * count] = scales.view(np.uint8)
    return raw.reshape(lead + (-1,))


def oracle(qt, raw):
    """gguf-py's dequantize of raw rows (..., row_bytes) -> float32 (..., cols)."""
    flat = raw.reshape(-1, raw.shape[-1])
    return np.asarray(dequantize(flat, qt), dtype=np.float32).reshape(raw.shape[:-1] + (-1,))


def assert_dot_close(got, w, x):
    """got (n, R) == x (n, C) @ w (R, C)^T within 1e-5 of each dot product's magnitude |x| . |w|."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 1e-5 * mag + 1e-30), f"worst relative error {np.max(err / (mag + 1e-30)):.3g}"


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def cols_for(qt, variant):
    """Row lengths: 1 and 3 blocks, one past a 256-element tile, and whole 256-element blocks (Q8_0's
    single-token kernel reads 8 blocks at a time); odd lengths for the float types."""
    qk = block_layout(qt)[0]
    if qk == 1:
        return (7, 33, 301, 512)[variant]
    return (qk, 3 * qk, 9 * qk if qk == 32 else 2 * qk, 16 * qk if qk == 32 else 4 * qk)[variant]


def own_decode_kernel(qt, cols):
    """Whether a single token of this type and row length takes its own kernel (cpu._VEC)."""
    return qt in cpu._VEC and cols % 256 == 0


@pytest.mark.parametrize("qt", FAST_TYPES, ids=name)
@pytest.mark.parametrize("rows", [1, 3, 17, 33])
@pytest.mark.parametrize("variant", [0, 1, 2, 3])
def test_matmul_matches_gguf_and_each_row_is_the_matvec(qt, rows, variant):
    rng = np.random.default_rng(1000 * rows + 10 * variant + int(qt))
    cols = cols_for(qt, variant)
    raw = random_weights(qt, (rows,), cols, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    out = np.full((5, rows), np.nan, np.float32)
    K.matmul(qt, raw, x, out)
    assert_dot_close(out, oracle(qt, raw), x)
    w = oracle(qt, raw)
    for t in range(5):  # prefill == decode: bit for bit, except where decode has its own single-token kernel
        one = np.full(rows, np.nan, np.float32)
        K.matvec(qt, raw, x[t], one)
        if own_decode_kernel(qt, cols):
            assert_dot_close(one[None], w, x[t][None])
            mag = np.abs(x[t]).astype(np.float64) @ np.abs(w).astype(np.float64).T
            assert np.all(np.abs(out[t].astype(np.float64) - one) <= 2e-5 * mag + 1e-30)  # and with the batch row
        else:
            assert same_bits(one, out[t])
    again = np.empty_like(out)
    K.matmul(qt, raw, x[::-1].copy(), again)  # another batch order: same bits per token
    assert same_bits(again[::-1].copy(), out)


@pytest.mark.parametrize("qt", FAST_TYPES, ids=name)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("per_slot", [False, True], ids=["kx=1", "kx=k"])
@pytest.mark.parametrize("variant", [1, 3])
def test_expert_matmul_matches_each_experts_matvec(qt, n, per_slot, variant):
    rng = np.random.default_rng(7 * n + per_slot + int(qt))
    E, rows, k = 6, 19, 3  # 19 rows: one full and one partial chunk of ROW_CHUNK rows
    cols = cols_for(qt, variant)
    raw = random_weights(qt, (E, rows), cols, rng)
    w = oracle(qt, raw)
    sel = rng.integers(0, E, size=(n, k)).astype(np.int32)
    sel[0, 1] = sel[0, 0]  # an expert chosen twice by one token
    if n > 1:
        sel[1, 2] = sel[0, 0]  # and by another token
    x = rng.standard_normal((n, k if per_slot else 1, cols)).astype(np.float32)
    out = np.full((n, k, rows), np.nan, np.float32)
    K.expert_matmul(qt, raw, sel, x, out)
    for t in range(n):
        for j in range(k):
            xin = x[t, j if per_slot else 0]
            assert_dot_close(out[t, j][None], w[sel[t, j]], xin[None])
            single = np.empty(rows, np.float32)
            K.matvec(qt, np.ascontiguousarray(raw[sel[t, j]]), xin, single)
            if own_decode_kernel(qt, cols) and n > 1:  # a batch takes the tiled kernel, a single token its own
                assert_dot_close(single[None], w[sel[t, j]], xin[None])
            else:
                assert same_bits(single, out[t, j])


@pytest.mark.parametrize("qt", FAST_TYPES + SLOW_TYPES, ids=name)
def test_get_rows_and_dequantize_rows_equal_gguf_exactly(qt):
    rng = np.random.default_rng(3 + int(qt))
    cols = cols_for(qt, 2)
    raw = random_weights(qt, (11,), cols, rng)
    w = oracle(qt, raw)
    for ids in (np.array([0, 10, 3, 3], np.int64), np.array([5], np.int32)):
        out = np.full((ids.shape[0], cols), np.nan, np.float32)
        K.get_rows(qt, raw, ids, out)
        assert same_bits(out, w[ids])
    assert same_bits(K.dequantize_rows(qt, raw, cols), w)
    stack = random_weights(qt, (2, 3), cols, rng)
    assert same_bits(K.dequantize_rows(qt, stack, cols), oracle(qt, stack))


@pytest.mark.parametrize("qt", SLOW_TYPES, ids=name)
def test_slow_path_types_multiply_in_bounded_chunks(qt, monkeypatch):
    rng = np.random.default_rng(5 + int(qt))
    cols = 4 * block_layout(qt)[0]
    monkeypatch.setattr(cpu, "SLOW_CHUNK_ELEMS", 3 * cols)  # 3 rows per chunk: 7 chunks for 20 rows
    chunks = []  # rows per gguf-py call: never the whole tensor
    dequantize_chunk = cpu._dequantize_chunk

    def recording(qtype, raw, cols):
        chunks.append(raw.shape[0])
        return dequantize_chunk(qtype, raw, cols)

    monkeypatch.setattr(cpu, "_dequantize_chunk", recording)
    raw = random_weights(qt, (2, 20), cols, rng)
    w = oracle(qt, raw)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    out = np.empty((2, 20), np.float32)
    K.matmul(qt, np.ascontiguousarray(raw[1]), x, out)
    assert_dot_close(out, w[1], x)
    assert chunks and max(chunks) <= 3, chunks
    one = np.empty(20, np.float32)
    K.matvec(qt, np.ascontiguousarray(raw[1]), x[1], one)
    assert same_bits(one, out[1])
    eo = np.empty((2, 2, 20), np.float32)
    K.expert_matmul(qt, raw, np.array([[1, 0], [0, 0]], np.int32), x[:, None, :], eo)
    assert same_bits(eo[0, 0], out[0])
    assert_dot_close(eo[0, 1][None], w[0], x[:1])
    assert_dot_close(eo[1, :], w[0], x[1:].repeat(2, axis=0))


def test_unknown_and_unreadable_types_raise_unsupported_type_error():
    x, out = np.zeros((1, 32), np.float32), np.zeros((1, 1), np.float32)
    with pytest.raises(UnsupportedTypeError, match="12345"):
        K.matmul(12345, np.zeros((1, 4), np.uint8), x, out)
    for qt in (QT.Q8_K, QT.I8):  # types gguf-py knows but cannot dequantize
        with pytest.raises(UnsupportedTypeError) as info:
            K.matvec(qt, np.zeros((1, 292), np.uint8), x[0], out[0])
        assert "\n" not in str(info.value) and qt.name in str(info.value)


def test_malformed_arguments_raise_value_error():
    rng = np.random.default_rng(2)
    raw = random_weights(QT.Q4_K, (4,), 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="bytes"):
        K.matmul(QT.Q4_K, raw, np.zeros((2, 512), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="float32"):
        K.matmul(QT.Q4_K, raw, x.astype(np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        K.matmul(QT.Q4_K, raw, x, np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="out"):
        K.matvec(QT.Q4_K, raw, x[0], np.empty((4, 2), np.float32)[:, 0])  # strided: results would be lost
    from engine.kernels.cpu_q8 import unavailable

    q8s = (False, True) if unavailable() is None else (False,)
    for bad, q8 in [(bad, q8) for bad in (2, -1) for q8 in q8s]:  # experts 0 and 1 only; the decode kernels
        with pytest.raises(IndexError):                           # check before reading a row
            K.expert_matmul(QT.Q4_K, raw.reshape(2, 2, -1), np.array([[0, bad]], np.int32), x[:1, None],
                            np.empty((1, 2, 2), np.float32), q8=q8)


@pytest.mark.parametrize("qt", (QT.Q4_K, QT.F16), ids=name)
def test_read_only_memory_mapped_weights_and_inputs(qt, tmp_path):
    rng = np.random.default_rng(9)
    raw = random_weights(qt, (3, 8), 512, rng)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    assert not mm.flags.writeable
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x_ro = x.copy()
    x_ro.setflags(write=False)
    a, b = np.empty((2, 8), np.float32), np.empty((2, 8), np.float32)
    K.matmul(qt, mm[1], x_ro, a)
    K.matmul(qt, raw[1], x, b)
    assert same_bits(a, b)
    sel = np.array([[2, 0], [1, 2]], np.int32)
    sel.setflags(write=False)
    ea, eb = np.empty((2, 2, 8), np.float32), np.empty((2, 2, 8), np.float32)
    K.expert_matmul(qt, mm, sel, x_ro[:, None], ea)
    K.expert_matmul(qt, raw, sel.copy(), x[:, None], eb)
    assert same_bits(ea, eb) and same_bits(ea[1, 0], a[1])  # expert 1, token 1
    rows = np.empty((2, 512), np.float32)
    K.get_rows(qt, mm[0], np.array([7, 0]), rows)
    assert same_bits(rows, oracle(qt, raw[0])[[7, 0]])


def test_nan_and_inf_flow_through_the_matmul():
    rng = np.random.default_rng(4)
    raw = random_weights(QT.Q4_K, (3,), 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    x[0, 17] = np.nan
    x[1, 5] = np.inf
    out = np.empty((2, 3), np.float32)
    K.matmul(QT.Q4_K, raw, x, out)
    assert np.isnan(out[0]).all() and not np.isfinite(out[1]).any()


def test_f16_and_bf16_decoders_on_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    want16 = bits.view(np.float16).astype(np.float32)
    scalar = np.array([cpu.f16_to_f32(int(b)) for b in bits], np.float32)  # the block-scale decoder
    vector = np.empty((1, 65536), np.float32)
    K.get_rows(QT.F16, bits.view(np.uint8).reshape(1, -1), np.array([0]), vector)  # the vectorised one
    finite_or_inf = ~np.isnan(want16)
    for got in (scalar, vector[0]):
        assert np.array_equal(np.isnan(got), ~finite_or_inf)
        assert same_bits(got[finite_or_inf], want16[finite_or_inf])  # subnormals, -0.0 and inf included
    wantbf = (bits.astype(np.uint32) << 16).view(np.float32)
    vector = np.empty((1, 65536), np.float32)
    K.get_rows(QT.BF16, bits.view(np.uint8).reshape(1, -1), np.array([0]), vector)
    assert same_bits(vector[0], wantbf)  # a shift: even NaN payloads survive
    scalar = np.array([cpu.bf16_to_f32(int(b)) for b in bits], np.float32)  # (returning to Python quiets NaNs)
    assert np.array_equal(np.isnan(scalar), np.isnan(wantbf))
    assert same_bits(scalar[~np.isnan(wantbf)], wantbf[~np.isnan(wantbf)])


def test_activation_stats_match_numpy_over_finite_values():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 7], x[2, 8], x[2, 9] = np.inf, -np.inf, np.nan
    x[3, :10] = 0.0
    x[3, 10] = -0.0
    x[4] = np.nan
    x[4, 3] = 2.5  # a single finite value
    x[5] = np.inf
    got = K.activation_stats(x)
    assert got.dtype == np.float64 and got.shape == (6, len(K.STAT_FIELDS))
    for i, row in enumerate(x.astype(np.float64)):
        f = row[np.isfinite(row)]
        counts = [np.isnan(row).sum(), np.isinf(row).sum(), (row == 0).sum()]
        if f.size:
            std = f.std(ddof=1) if f.size > 1 else 0.0
            want = [row.size, f.mean(), std, f.min(), f.max(), np.sqrt((f * f).sum()), np.abs(f).max(), *counts]
        else:
            want = [row.size, *[np.nan] * 6, *counts]
        assert np.allclose(got[i], want, rtol=1e-12, atol=1e-12, equal_nan=True), (i, got[i], want)
    assert got[3, 9] == 11 and got[4, 2] == 0.0 and np.isnan(got[5, 1:7]).all()
    one = K.activation_stats(x[0])
    assert one.shape == (10,) and np.array_equal(one, got[0])


def test_activation_stats_serial_and_parallel_paths_agree_bit_for_bit():
    x = np.random.default_rng(12).standard_normal((40, cpu.STATS_PARALLEL_MIN // 20)).astype(np.float32)
    x[3, 5] = np.nan
    assert x.size >= cpu.STATS_PARALLEL_MIN  # the whole array takes the parallel kernel, single rows the serial one
    whole = K.activation_stats(x)
    rows = np.stack([K.activation_stats(r) for r in x])
    assert np.array_equal(whole, rows, equal_nan=True)
