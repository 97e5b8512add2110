"""Quantized CPU kernels (Numba): fused dequantize-and-multiply reading GGUF blocks in place.

Follows ggml's block layouts (ggml-common.h) and gguf-py's `dequantize`, which is the test oracle
(tests/engine/test_kernels.py). One kernel shape serves decode, prefill and the experts:

    OUT[oi[p], r] = sum_c W[e_g, r, c] * X[xi[p], c]     for every pair p of group g, every row r

A group is one expert (or the whole matrix for a plain matmul) with the list of (input row, output
row) pairs that use it, so an expert's rows are read once per batch however many tokens chose it.
Each dot product is accumulated block by block in the same order whatever the batch, so a row of a
prefill matmul is bit-identical to the decode matvec of that token.

Legend: E = experts, R = rows (output features), C = cols (input features), RB = bytes per row,
QK = elements per block, m = input rows (tokens, or token x slot pairs).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..errors import UnsupportedTypeError
from ..quants import QK_K, QT, block_layout, type_name

STAT_FIELDS = ("count", "mean", "std_dev", "min", "max", "l2_norm", "abs_max", "nan_count", "inf_count",
               "zero_count")
ROW_CHUNK = 16  # rows per parallel work item


# ---------------------------------------------------------------------------------------------
# scalar decoders
@njit(inline="always", cache=True)
def f16_to_f32(h):
    """IEEE half (as an int 0..65535) -> float32, subnormals, inf and nan included."""
    sign = (h >> 15) & 1
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0:
        val = np.float32(man) * np.float32(5.9604644775390625e-08)  # man * 2^-24
    elif exp == 31:
        val = np.float32(np.inf) if man == 0 else np.float32(np.nan)
    else:
        val = np.float32(math.ldexp(1024.0 + man, exp - 25))
    return -val if sign else val


@njit(inline="always", cache=True)
def bf16_to_f32(h):
    """bfloat16 (the upper 16 bits of a float32) -> float32."""
    sign = (h >> 15) & 1
    exp = (h >> 7) & 0xFF
    man = h & 0x7F
    if exp == 0:
        val = np.float32(math.ldexp(float(man), -133))
    elif exp == 255:
        val = np.float32(np.inf) if man == 0 else np.float32(np.nan)
    else:
        val = np.float32(math.ldexp(128.0 + man, exp - 134))
    return -val if sign else val


@njit(inline="always", cache=True)
def _half(row, off):
    return f16_to_f32(np.int64(row[off]) | (np.int64(row[off + 1]) << 8))


# ---------------------------------------------------------------------------------------------
# block decoders: dequantize block `b` of a uint8 row into buf[0:QK]
@njit(inline="always", cache=True)
def _block_q8_0(row, b, buf):
    # Q8_0: d:f16, qs:int8[32]
    base = b * 34
    d = _half(row, base)
    for l in range(32):
        q = np.int32(row[base + 2 + l])
        if q > 127:
            q -= 256
        buf[l] = d * np.float32(q)


@njit(inline="always", cache=True)
def _scale_min_k4(scales_at, j, row):
    # 8 six-bit scales and 8 six-bit mins packed in 12 bytes:
    #   j < 4:  sc = s[j] & 63,                        m = s[j+4] & 63
    #   j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4
    if j < 4:
        sc = np.int32(row[scales_at + j]) & 63
        m = np.int32(row[scales_at + j + 4]) & 63
    else:
        sc = (np.int32(row[scales_at + j + 4]) & 0xF) | ((np.int32(row[scales_at + j - 4]) >> 6) << 4)
        m = (np.int32(row[scales_at + j + 4]) >> 4) | ((np.int32(row[scales_at + j]) >> 6) << 4)
    return sc, m


@njit(inline="always", cache=True)
def _block_q4_k(row, b, buf):
    # Q4_K: d:f16, dmin:f16, scales:u8[12], qs:u8[128]; 4 groups of 64 = low nibbles (sub-block 2g)
    # then high nibbles (sub-block 2g+1) of the same 32 bytes; y = d*sc*q - dmin*m
    base = b * 144
    d = _half(row, base)
    dmin = _half(row, base + 2)
    for g in range(4):
        sc1, m1 = _scale_min_k4(base + 4, 2 * g, row)
        sc2, m2 = _scale_min_k4(base + 4, 2 * g + 1, row)
        d1, mn1 = d * np.float32(sc1), dmin * np.float32(m1)
        d2, mn2 = d * np.float32(sc2), dmin * np.float32(m2)
        qs = base + 16 + 32 * g
        for l in range(32):
            q = np.int32(row[qs + l])
            buf[64 * g + l] = d1 * np.float32(q & 0xF) - mn1
            buf[64 * g + 32 + l] = d2 * np.float32(q >> 4) - mn2


@njit(inline="always", cache=True)
def _block_q5_k(row, b, buf):
    # Q5_K: d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]; the 5th bit of sub-block j is bit j of qh[l]
    base = b * 176
    d = _half(row, base)
    dmin = _half(row, base + 2)
    for g in range(4):
        sc1, m1 = _scale_min_k4(base + 4, 2 * g, row)
        sc2, m2 = _scale_min_k4(base + 4, 2 * g + 1, row)
        d1, mn1 = d * np.float32(sc1), dmin * np.float32(m1)
        d2, mn2 = d * np.float32(sc2), dmin * np.float32(m2)
        qs = base + 48 + 32 * g
        for l in range(32):
            q = np.int32(row[qs + l])
            h = np.int32(row[base + 16 + l])
            lo = (q & 0xF) + (((h >> (2 * g)) & 1) << 4)
            hi = (q >> 4) + (((h >> (2 * g + 1)) & 1) << 4)
            buf[64 * g + l] = d1 * np.float32(lo) - mn1
            buf[64 * g + 32 + l] = d2 * np.float32(hi) - mn2


@njit(inline="always", cache=True)
def _block_q6_k(row, b, buf):
    # Q6_K: ql:u8[128] (low 4 bits), qh:u8[64] (high 2 bits), scales:i8[16], d:f16; two halves of 128,
    # each: 4 quarters of 32 from ql[l], ql[l+32] (low/high nibbles) and qh[l] bits (0,2,4,6)
    base = b * 210
    d = _half(row, base + 208)
    for n in range(2):
        ql = base + 64 * n
        qh = base + 128 + 32 * n
        sc = base + 192 + 8 * n
        for l in range(32):
            h = np.int32(row[qh + l])
            a = np.int32(row[ql + l])
            c = np.int32(row[ql + l + 32])
            s = l // 16
            q1 = ((a & 0xF) | ((h & 3) << 4)) - 32
            q2 = ((c & 0xF) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) - 32
            s1, s2, s3, s4 = (np.int32(row[sc + s]), np.int32(row[sc + s + 2]), np.int32(row[sc + s + 4]),
                              np.int32(row[sc + s + 6]))
            s1 = s1 - 256 if s1 > 127 else s1
            s2 = s2 - 256 if s2 > 127 else s2
            s3 = s3 - 256 if s3 > 127 else s3
            s4 = s4 - 256 if s4 > 127 else s4
            buf[128 * n + l] = d * np.float32(s1) * np.float32(q1)
            buf[128 * n + l + 32] = d * np.float32(s2) * np.float32(q2)
            buf[128 * n + l + 64] = d * np.float32(s3) * np.float32(q3)
            buf[128 * n + l + 96] = d * np.float32(s4) * np.float32(q4)


# float rows are read in pseudo-blocks of 32 elements (any tail is handled by the kernel)
@njit(inline="always", cache=True)
def _conv_f32(v):
    return v


@njit(inline="always", cache=True)
def _conv_f16(v):
    return f16_to_f32(np.int64(v))


@njit(inline="always", cache=True)
def _conv_bf16(v):
    return bf16_to_f32(np.int64(v))


# ---------------------------------------------------------------------------------------------
# kernel factories: one grouped matmul per block format
def _make_block_kernel(block, qk):
    @njit(cache=True, parallel=True, fastmath=False)
    def _grouped_matmul(w, experts, offsets, xi, oi, x, out):
        n_groups = experts.shape[0]
        rows = w.shape[1]
        nblk = x.shape[1] // qk
        nchunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
        for item in prange(n_groups * nchunks):
            g = item // nchunks
            c = item % nchunks
            e = experts[g]
            p0 = offsets[g]
            npairs = offsets[g + 1] - p0
            buf = np.empty(qk, dtype=np.float32)
            acc = np.empty(npairs, dtype=np.float32)
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
                row = w[e, r]
                acc[:] = 0.0
                for b in range(nblk):
                    block(row, b, buf)
                    col = b * qk
                    for p in range(npairs):
                        xr = xi[p0 + p]
                        s = np.float32(0.0)
                        for l in range(qk):
                            s += buf[l] * x[xr, col + l]
                        acc[p] += s
                for p in range(npairs):
                    out[oi[p0 + p], r] = acc[p]

    @njit(cache=True, parallel=True)
    def _get_rows(w, ids, out):
        for t in prange(ids.shape[0]):
            row = w[ids[t]]
            buf = np.empty(qk, dtype=np.float32)
            for b in range(out.shape[1] // qk):
                block(row, b, buf)
                for l in range(qk):
                    out[t, b * qk + l] = buf[l]

    return _grouped_matmul, _get_rows


def _make_float_kernel(conv):
    @njit(cache=True, parallel=True, fastmath=False)
    def _grouped_matmul(w, experts, offsets, xi, oi, x, out):
        n_groups = experts.shape[0]
        rows = w.shape[1]
        cols = x.shape[1]
        nblk = cols // 32
        nchunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
        for item in prange(n_groups * nchunks):
            g = item // nchunks
            c = item % nchunks
            e = experts[g]
            p0 = offsets[g]
            npairs = offsets[g + 1] - p0
            buf = np.empty(32, dtype=np.float32)
            acc = np.empty(npairs, dtype=np.float32)
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
                row = w[e, r]
                acc[:] = 0.0
                for b in range(nblk + 1):
                    col = b * 32
                    n = min(32, cols - col)
                    if n <= 0:
                        break
                    for l in range(n):
                        buf[l] = conv(row[col + l])
                    for p in range(npairs):
                        xr = xi[p0 + p]
                        s = np.float32(0.0)
                        for l in range(n):
                            s += buf[l] * x[xr, col + l]
                        acc[p] += s
                for p in range(npairs):
                    out[oi[p0 + p], r] = acc[p]

    @njit(cache=True, parallel=True)
    def _get_rows(w, ids, out):
        for t in prange(ids.shape[0]):
            row = w[ids[t]]
            for l in range(out.shape[1]):
                out[t, l] = conv(row[l])

    return _grouped_matmul, _get_rows


_BLOCK_KERNELS = {
    QT.Q8_0: _make_block_kernel(_block_q8_0, 32),
    QT.Q4_K: _make_block_kernel(_block_q4_k, QK_K),
    QT.Q5_K: _make_block_kernel(_block_q5_k, QK_K),
    QT.Q6_K: _make_block_kernel(_block_q6_k, QK_K),
}
_FLOAT_KERNELS = {
    QT.F32: (_make_float_kernel(_conv_f32), np.float32),
    QT.F16: (_make_float_kernel(_conv_f16), np.uint16),
    QT.BF16: (_make_float_kernel(_conv_bf16), np.uint16),
}


# ---------------------------------------------------------------------------------------------
# public wrappers: validate once, group, dispatch
def _typed(qtype: int, w: np.ndarray):
    """(kernels, weights as the kernel reads them): float types are viewed as their element type."""
    try:
        qt = QT(qtype)
    except ValueError:
        raise UnsupportedTypeError(f"unknown tensor type id {qtype}") from None
    if qt in _BLOCK_KERNELS:
        return _BLOCK_KERNELS[qt], w
    if qt in _FLOAT_KERNELS:
        kernels, dtype = _FLOAT_KERNELS[qt]
        return kernels, w.view(dtype)
    return None, w


def _as3d(w: np.ndarray) -> np.ndarray:
    return w if w.ndim == 3 else w.reshape((1,) + w.shape)


def _slow_rows(qtype: int, w3: np.ndarray, e: int, r0: int, r1: int, cols: int) -> np.ndarray:
    """Rows r0..r1 of expert e dequantized with gguf-py: the path for types without a fast kernel."""
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(np.ascontiguousarray(w3[e, r0:r1]), QT(qtype)), dtype=np.float32).reshape(
            r1 - r0, cols)
    except NotImplementedError:
        raise UnsupportedTypeError(f"no kernel reads tensors of type {type_name(qtype)}") from None


SLOW_ROWS = 64


def _grouped(qtype, w3, experts, offsets, xi, oi, x, out):
    kernels, wt = _typed(qtype, w3)
    if kernels is not None:
        kernels[0](wt, experts, offsets, xi, oi, x, out)
        return
    rows, cols = out.shape[1], x.shape[1]
    for g, e in enumerate(experts):
        pairs = slice(offsets[g], offsets[g + 1])
        for r0 in range(0, rows, SLOW_ROWS):
            r1 = min(rows, r0 + SLOW_ROWS)
            deq = _slow_rows(qtype, w3, int(e), r0, r1, cols)
            out[oi[pairs], r0:r1] = x[xi[pairs]] @ deq.T


def _check_cols(qtype, w: np.ndarray, cols: int):
    elems, nbytes = block_layout(qtype)
    if cols % elems or w.shape[-1] != cols // elems * nbytes:
        raise ValueError(f"{type_name(qtype)} rows of {w.shape[-1]} bytes do not hold {cols} columns")


def matmul(qtype: int, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out (n, R) = x (n, C) @ W^T; w: uint8 (R, RB) raw GGUF rows."""
    n = x.shape[0]
    _check_cols(qtype, w, x.shape[1])
    idx = np.arange(n, dtype=np.int64)
    _grouped(qtype, _as3d(w), np.zeros(1, np.int64), np.array([0, n], np.int64), idx, idx, x, out)


def matvec(qtype: int, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out (R,) = W @ x (C,); the same kernel as matmul with one row, so results are identical."""
    matmul(qtype, w, x.reshape(1, -1), out.reshape(1, -1))


def expert_matmul(qtype: int, w: np.ndarray, sel: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, j] = W[sel[t, j]] @ x[t, j if kx == k else 0] for all tokens and their k experts, in one call.

    w: uint8 (E, R, RB); sel: int (n, k); x: f32 (n, kx, C) with kx in {1, k}; out: f32 (n, k, R).
    """
    n, k = sel.shape
    kx = x.shape[1]
    _check_cols(qtype, w, x.shape[2])
    flat = sel.reshape(-1).astype(np.int64)
    order = np.argsort(flat, kind="stable")  # pairs grouped by expert
    experts, starts = np.unique(flat[order], return_index=True)
    offsets = np.append(starts, flat.size).astype(np.int64)
    t, j = np.divmod(order, k)
    xi = (t * kx + (j if kx == k else 0)).astype(np.int64)
    _grouped(qtype, w, experts.astype(np.int64), offsets, xi, order.astype(np.int64),
             x.reshape(n * kx, -1), out.reshape(n * k, -1))


def get_rows(qtype: int, w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out (n, C) = the dequantized rows `ids` of w: the embedding lookup."""
    ids = np.asarray(ids, dtype=np.int64)
    _check_cols(qtype, w, out.shape[1])
    kernels, wt = _typed(qtype, w)
    if kernels is not None:
        kernels[1](wt, ids, out)
        return
    for t, i in enumerate(ids):
        out[t] = _slow_rows(qtype, _as3d(w), 0, int(i), int(i) + 1, out.shape[1])[0]


def dequantize_rows(qtype: int, w: np.ndarray, cols: int) -> np.ndarray:
    """float32 (R, C) of a 2-D raw block array, (E, R, C) of a 3-D one."""
    w3 = _as3d(w)
    out = np.empty(w3.shape[:2] + (cols,), dtype=np.float32)
    for e in range(w3.shape[0]):
        get_rows(qtype, w3[e], np.arange(w3.shape[1]), out[e])
    return out if w.ndim == 3 else out[0]


# ---------------------------------------------------------------------------------------------
# activation statistics, reduced where the data is
@njit(cache=True, parallel=True)
def _stats_rows(x, out):
    for i in prange(x.shape[0]):
        n = 0
        nan = 0
        inf = 0
        zero = 0
        s = 0.0
        mn = np.inf
        mx = -np.inf
        for v in x[i]:
            if np.isnan(v):
                nan += 1
            elif np.isinf(v):
                inf += 1
            else:
                fv = np.float64(v)
                n += 1
                s += fv
                mn = min(mn, fv)
                mx = max(mx, fv)
                if v == 0:
                    zero += 1
        mean = s / n if n else np.nan
        ss = 0.0
        sq = 0.0
        for v in x[i]:
            if np.isfinite(v):
                dv = np.float64(v) - mean
                ss += dv * dv
                sq += np.float64(v) * np.float64(v)
        out[i, 0] = x.shape[1]
        out[i, 1] = mean
        out[i, 2] = math.sqrt(ss / (n - 1)) if n > 1 else (0.0 if n == 1 else np.nan)
        out[i, 3] = mn if n else np.nan
        out[i, 4] = mx if n else np.nan
        out[i, 5] = math.sqrt(sq) if n else np.nan
        out[i, 6] = max(abs(mn), abs(mx)) if n else np.nan
        out[i, 7] = nan
        out[i, 8] = inf
        out[i, 9] = zero


def activation_stats(x: np.ndarray) -> np.ndarray:
    """float64 (10,) for x (d,), or (n, 10) for x (n, d), in STAT_FIELDS order.

    std_dev is the sample standard deviation (n - 1). mean, std_dev, min, max, l2_norm and abs_max are
    over the finite values (NaN when there are none); the counts count every element.
    """
    x2 = np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1), dtype=np.float32)
    out = np.empty((x2.shape[0], len(STAT_FIELDS)), dtype=np.float64)
    _stats_rows(x2, out)
    return out[0] if x.ndim == 1 else out
