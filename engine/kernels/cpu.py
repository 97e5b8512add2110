"""Quantized CPU kernels (Numba): dequantize-and-multiply reading GGUF blocks in place.

Follows ggml's block layouts (ggml-common.h; the table is engine/quants.py) and gguf-py's
`gguf/quants.py` `dequantize_blocks`, the oracle of tests/engine/test_kernels.py: each `_deq_<type>`
does gguf-py's float operations in gguf-py's order, field by field.

One parallel kernel per fast type (`_matmul_q4_k`, ...) serves decode, prefill and the experts:

    out[p, r] = sum_c W[sel[p], r, c] * x[xrow(p), c]     for every pair p = t * k + j, every row r

Pairs are grouped by expert and a work item is (expert, chunk of 16 rows), so an expert's rows are
read once per batch however many tokens chose it; a plain matmul is the case E = k = 1. The rows of a
chunk are dequantized one tile (256 elements, one K-quant block) at a time into a 16 KiB buffer, never
as whole rows, and the tiles are multiplied with the inputs of every pair of the group: unpacking is
shared by the batch and each input tile is read once per chunk. A dot product is the sum, in tile
order, of per-tile float32 reductions whose order is fixed when the kernel compiles: it never depends
on the batch, so a prefill row does not depend on the other tokens of the batch or their order, and
reruns are bit-identical (no atomics, no thread-dependent reductions).

A single token (decode) of Q4_K, Q5_K, Q6_K or Q8_0 takes its own kernel (`_vec_*`): with one input there is no
unpacking to share, so it dots each row straight from its blocks (Q5_K and Q8_0 too, when rows are
whole 256-weight blocks), each block straight-line vector IR
(engine/kernels/blocks.py) that applies each sub-block's scale once per sub-block. Its results agree
with the tiled kernel's to float32 rounding, not bit for bit.

Types without a fast kernel are dequantized by gguf-py, a bounded chunk of rows at a time, and
multiplied by the F32 kernel.

Legend: E = experts, R = rows (output features), C = cols (input features), RB = bytes per row,
n = tokens, k = experts per token, kx = input rows per token (1 or k), P = n * k pairs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from gguf.quants import dequantize as gguf_dequantize
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import UnsupportedTypeError
from ..quants import QK_K, QT, block_layout, readable, type_name

from ..recorder import STAT_FIELDS  # noqa: E402  (re-exported: engine.kernels.STAT_FIELDS)
from . import blocks

ROW_CHUNK = 16  # rows per work item: their tiles (16 KiB) and an input tile stay in L1
TILE = QK_K  # elements dequantized at a time: one K-quant block, 8 Q8_0 blocks; the last tile may be shorter
SLOW_CHUNK_ELEMS = 1 << 16  # the slow path dequantizes about this many weights (256 KiB of f32) at a time

# The matmul kernels let LLVM reassociate the sum inside a tile (so it vectorises the reduction, in
# an order fixed at compile time) and fuse multiply-adds. Never nnan/ninf: a NaN or Inf must reach
# the forward's non-finite check. The row-gather kernels use no fastmath: gguf-py's values exactly.
FASTMATH = {"reassoc", "contract"}
# Numba widens integer arithmetic to int64, which halves the SIMD width of the bit unpacking; wrapping
# each step in I32 lets LLVM keep the lanes 32 bits (or narrower) wide.
I32 = np.int32


# ---------------------------------------------------------------------------------------------
# scalar decoders
@intrinsic
def _bits_to_f32(typingctx, bits):
    """The float32 whose IEEE-754 bits are the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif bits.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    """The IEEE-754 bits of a float32, as a non-negative int64."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(value), codegen


@intrinsic
def _add_in_order(typingctx, acc, term):
    """acc + term as a plain IEEE add whatever the caller's fastmath: tile partials are summed in tile order."""
    if acc != types.float32 or term != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return types.float32(acc, term), codegen


@intrinsic
def _opaque(typingctx, n):
    """n, hidden from the optimiser. `for l in range(_opaque(256))` stays a loop that LLVM vectorises
    with several accumulators; a constant trip count is fully unrolled instead, into one serial chain of
    vector adds (or, inside a loop over blocks, into a strided gather across blocks)."""
    if n != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.asm(ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), "", "=r,0", [args[0]], False)

    return types.int64(n), codegen


@intrinsic
def _shr32(typingctx, value, shift):
    """value >> shift on 32-bit lanes for a shift known only at run time (Numba would widen it to int64)."""
    if not isinstance(value, types.Integer) or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v, n = args
        v = builder.trunc(v, ir.IntType(32)) if value.bitwidth > 32 else builder.zext(v, ir.IntType(32))
        n = builder.trunc(n, ir.IntType(32)) if shift.bitwidth > 32 else builder.zext(n, ir.IntType(32))
        return builder.lshr(v, n)

    return types.int32(value, shift), codegen


@njit(cache=True)
def f16_to_f32(h):
    """IEEE half (its 16 bits as an integer) -> float32; subnormals, inf and nan included. Branch-free."""
    h = np.int64(h)
    em = h & 0x7FFF  # exponent and mantissa
    normal = _bits_to_f32((em << 13) + ((127 - 15) << 23))  # rebias the exponent
    subnormal = np.float32(em) * np.float32(5.9604644775390625e-08)  # mantissa * 2^-24, exact
    special = _bits_to_f32((em << 13) | 0x7F800000)  # inf, nan (payload kept)
    v = subnormal if em < 0x400 else (special if em >= 0x7C00 else normal)
    return _bits_to_f32(_f32_to_bits(v) | ((h & 0x8000) << 16))


@njit(cache=True)
def bf16_to_f32(h):
    """bfloat16 (the upper 16 bits of a float32, as an integer) -> float32."""
    return _bits_to_f32(np.int64(h) << 16)


@njit(cache=True)
def _half(row, off):
    """The little-endian f16 at byte `off` of a uint8 (or int8) row, as float32."""
    return f16_to_f32((np.int64(row[off]) & 0xFF) | ((np.int64(row[off + 1]) & 0xFF) << 8))


@njit(cache=True)
def _scale_min_k4(row, at, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at row[at:at + 12].

    byte 0-3: mmSSSSSS (j<4: S = scale j; mm = high bits of scale j+4)   bytes 4-7: same for the mins
    byte 8-11: MMMMSSSS (low 4 bits of scale j+4 and min j+4)
    """
    if j < 4:
        sc = np.int32(row[at + j]) & 63
        m = np.int32(row[at + j + 4]) & 63
    else:
        sc = (np.int32(row[at + j + 4]) & 0xF) | ((np.int32(row[at + j - 4]) >> 6) << 4)
        m = (np.int32(row[at + j + 4]) >> 4) | ((np.int32(row[at + j]) >> 6) << 4)
    return np.float32(sc), np.float32(m)


@njit(cache=True)
def _i8(byte):
    """A uint8 read as int8, as float32."""
    v = np.int32(byte)
    return np.float32(v - 256 if v > 127 else v)


# ---------------------------------------------------------------------------------------------
# tile dequantizers: elements [c, c + n) of a W row (RB,) -> out[o:o + n]; c and n are whole blocks
# (floats: any n). The same float operations as gguf-py's dequantize_blocks, in the same order.
@njit(inline="always")
def _deq_f32(row, c, n, out, o):
    for l in range(n):
        out[o + l] = row[c + l]


@njit(inline="always")
def _deq_f16(row, c, n, out, o):
    for l in range(n):
        out[o + l] = f16_to_f32(row[c + l])


@njit(inline="always")
def _deq_bf16(row, c, n, out, o):
    for l in range(n):
        out[o + l] = bf16_to_f32(row[c + l])


@njit(inline="always")
def _deq_q8_0(row, c, n, out, o):
    # Q8_0 block: d:f16, qs:int8[32]; y = d * q. `row` is the int8 view of the bytes.
    for i in range(n // 32):
        base = (c // 32 + i) * 34
        d = _half(row, base)
        for l in range(_opaque(32)):
            out[o + 32 * i + l] = d * np.float32(row[base + 2 + l])


@njit(inline="always")
def _deq_q4_k(row, c, n, out, o):
    # Q4_K block: d:f16, dmin:f16, scales:u8[12], qs:u8[128]. Four groups of 64 elements: the low
    # nibbles of 32 bytes (sub-block 2g), then their high nibbles (2g + 1); y = d*sc*q - dmin*m.
    base = c // QK_K * 144
    d = _half(row, base)
    dmin = _half(row, base + 2)
    for g in range(4):
        sc1, m1 = _scale_min_k4(row, base + 4, 2 * g)
        sc2, m2 = _scale_min_k4(row, base + 4, 2 * g + 1)
        d1, dm1, d2, dm2 = d * sc1, dmin * m1, d * sc2, dmin * m2
        qs = base + 16 + 32 * g
        for l in range(32):
            q = I32(row[qs + l])
            out[o + 64 * g + l] = d1 * np.float32(I32(q & 0xF)) - dm1
            out[o + 64 * g + 32 + l] = d2 * np.float32(I32(q >> 4)) - dm2


@njit(inline="always")
def _deq_q5_k(row, c, n, out, o):
    # Q5_K block: d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]. As Q4_K, plus a fifth bit:
    # bit j of qh[l] belongs to element l of sub-block j.
    base = c // QK_K * 176
    d = _half(row, base)
    dmin = _half(row, base + 2)
    for g in range(4):
        sc1, m1 = _scale_min_k4(row, base + 4, 2 * g)
        sc2, m2 = _scale_min_k4(row, base + 4, 2 * g + 1)
        d1, dm1, d2, dm2 = d * sc1, dmin * m1, d * sc2, dmin * m2
        qs = base + 48 + 32 * g
        for l in range(32):
            q = I32(row[qs + l])
            h = _shr32(row[base + 16 + l], 2 * g)
            out[o + 64 * g + l] = d1 * np.float32(I32(I32(q & 0xF) | I32(I32(h & 1) << 4))) - dm1
            out[o + 64 * g + 32 + l] = d2 * np.float32(I32(I32(q >> 4) | I32(I32(h & 2) << 3))) - dm2


@njit(inline="always")
def _deq_q6_k(row, c, n, out, o):
    # Q6_K block: ql:u8[128], qh:u8[64], scales:i8[16], d:f16. Two halves of 128 elements; in half h,
    # element 32 i + l (i = 0..3, l = 0..31) is (nibble i // 2 of ql[64h + 32 (i % 2) + l])
    # | (bits 2i, 2i+1 of qh[32h + l]) << 4, minus 32, times d * scales[(128h + 32i + l) // 16].
    base = c // QK_K * 210
    d = _half(row, base + 208)
    for h in range(2):
        ql = base + 64 * h
        qh = base + 128 + 32 * h
        for half16 in range(2):
            at = base + 192 + 8 * h + half16
            d0, d1, d2, d3 = d * _i8(row[at]), d * _i8(row[at + 2]), d * _i8(row[at + 4]), d * _i8(row[at + 6])
            at_out = o + 128 * h
            for l in range(16 * half16, 16 * half16 + 16):
                lo = I32(row[ql + l])
                hi = I32(row[ql + 32 + l])
                hb = I32(row[qh + l])
                out[at_out + l] = d0 * np.float32(I32(I32(I32(lo & 0xF) | I32(I32(hb << 4) & 0x30)) - 32))
                out[at_out + 32 + l] = d1 * np.float32(I32(I32(I32(hi & 0xF) | I32(I32(hb << 2) & 0x30)) - 32))
                out[at_out + 64 + l] = d2 * np.float32(I32(I32(I32(lo >> 4) | I32(hb & 0x30)) - 32))
                out[at_out + 96 + l] = d3 * np.float32(I32(I32(I32(hi >> 4) | I32(I32(hb >> 2) & 0x30)) - 32))


@njit(inline="always")
def _dot(tiles, o, x, xr, c, n):
    """sum(tiles[o:o + n] * x[xr, c:c + n]): one tile's share of a dot product, a scalar float32 reduction."""
    s = np.float32(0.0)
    for l in range(_opaque(n)):  # a loop (4 vector accumulators), not a fully unrolled serial chain
        s += tiles[o + l] * x[xr, c + l]
    return s


# ---------------------------------------------------------------------------------------------
# grouping and the parallel kernels
@njit(cache=True)
def _group_by_expert(sel, n_experts):
    """Pairs p = t * k + j grouped by expert, stable: (active experts (G,), starts (E + 1,), order (P,)).

    The pairs of expert e are order[starts[e]:starts[e + 1]].
    """
    counts = np.zeros(n_experts + 1, np.int64)
    flat = sel.ravel()
    for p in range(flat.shape[0]):
        e = flat[p]
        if e < 0 or e >= n_experts:
            raise IndexError("expert id out of range")
        counts[e + 1] += 1
    n_active = 0
    for e in range(n_experts):
        n_active += counts[e + 1] > 0
        counts[e + 1] += counts[e]
    active = np.empty(n_active, np.int64)
    g = 0
    for e in range(n_experts):
        if counts[e + 1] > counts[e]:
            active[g] = e
            g += 1
    fill = counts[:-1].copy()
    order = np.empty(flat.shape[0], np.int64)
    for p in range(flat.shape[0]):
        order[fill[flat[p]]] = p
        fill[flat[p]] += 1
    return active, counts, order


@njit(inline="always")
def _grouped_matmul(deq, w, sel, x, kx, out):
    """The grouped matmul of the module docstring, with the tile dequantizer `deq` of one type:
    out (P, R)[p, r] = W[sel[p], r] . x[xrow(p)], xrow(p) = p when kx == k (one input per slot),
    p // k when kx == 1 (one input per token). Inlined into one cached kernel per type."""
    k = sel.shape[1]
    rows = w.shape[1]
    cols = x.shape[1]
    active, starts, order = _group_by_expert(sel, w.shape[0])
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for item in prange(active.shape[0] * n_chunks):
        e = active[item // n_chunks]
        r0 = item % n_chunks * ROW_CHUNK
        nr = min(rows, r0 + ROW_CHUNK) - r0
        p0 = starts[e]
        m = starts[e + 1] - p0
        tiles = np.empty(ROW_CHUNK * TILE, np.float32)  # tile j of each row of the chunk
        acc = np.zeros((m, ROW_CHUNK), np.float32)
        for j in range((cols + TILE - 1) // TILE):  # (a stepped range defeats LLVM's index analysis)
            c = j * TILE
            n = min(TILE, cols - c)
            for q in range(nr):
                deq(w[e, r0 + q], c, n, tiles, q * TILE)
            for i in range(m):  # each input's tile is read once for the chunk's rows
                p = order[p0 + i]
                xr = p if kx == k else p // k
                for q in range(nr):
                    acc[i, q] = _add_in_order(acc[i, q], _dot(tiles, q * TILE, x, xr, c, n))
        for i in range(m):
            for q in range(nr):
                out[order[p0 + i], r0 + q] = acc[i, q]


@njit(inline="always")
def _gather_rows(deq, w, ids, out):
    """out (n, C)[t] = W[ids[t]] dequantized by `deq`: gguf-py's values exactly (callers use no fastmath)."""
    cols = out.shape[1]
    for t in prange(ids.shape[0]):
        row = w[ids[t]]
        for j in range((cols + TILE - 1) // TILE):
            deq(row, j * TILE, min(TILE, cols - j * TILE), out[t], j * TILE)


# One cached kernel per type and job (a factory's closures would be recompiled by every new process).
# w (E, R, RB) viewed as the type's element; sel int32 (n, k); x f32 (n * kx, C); out f32 (n * k, R).
@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_f32(w, sel, x, kx, out):
    _grouped_matmul(_deq_f32, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_f16(w, sel, x, kx, out):
    _grouped_matmul(_deq_f16, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_bf16(w, sel, x, kx, out):
    _grouped_matmul(_deq_bf16, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_q8_0(w, sel, x, kx, out):
    _grouped_matmul(_deq_q8_0, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_q4_k(w, sel, x, kx, out):
    _grouped_matmul(_deq_q4_k, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_q5_k(w, sel, x, kx, out):
    _grouped_matmul(_deq_q5_k, w, sel, x, kx, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matmul_q6_k(w, sel, x, kx, out):
    _grouped_matmul(_deq_q6_k, w, sel, x, kx, out)


# w (R, RB) viewed as the type's element; ids int64 (n,); out f32 (n, C)
@njit(cache=True, parallel=True)
def _rows_f32(w, ids, out):
    _gather_rows(_deq_f32, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_f16(w, ids, out):
    _gather_rows(_deq_f16, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_bf16(w, ids, out):
    _gather_rows(_deq_bf16, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_q8_0(w, ids, out):
    _gather_rows(_deq_q8_0, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_q4_k(w, ids, out):
    _gather_rows(_deq_q4_k, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_q5_k(w, ids, out):
    _gather_rows(_deq_q5_k, w, ids, out)


@njit(cache=True, parallel=True)
def _rows_q6_k(w, ids, out):
    _gather_rows(_deq_q6_k, w, ids, out)


# ---------------------------------------------------------------------------------------------
# single-token kernels (decode): each weight is unpacked once and used once, so there is nothing to
# share through a tile buffer. A row is dotted block by block with the whole-block IR of blocks.py:
# d*sc*sum(q*x) - dmin*m*sum(x) per sub-block instead of sum((d*sc*q - dmin*m)*x), the sums of x per 32
# elements (the K-quants' mins) computed once per call. Same products, fewer multiplies; the rounding
# differs from the tiled kernels' in the last bits. Q8_0 is read 8 blocks (256 weights) at a time, so its
# rows take this path when their length is a multiple of 256 (the model's always are).
# per type: (bytes per 256 weights, byte of the f16 d in them, byte of the f16 dmin); -1: the block
# intrinsic decodes its own scales (Q8_0's 8), or the type has no dmin
_ROW_BLOCKS = {QT.Q4_K: (144, 0, 2), QT.Q5_K: (176, 0, 2), QT.Q6_K: (210, 208, -1), QT.Q8_0: (8 * 34, -1, -1)}


def _row_dot(block, qtype: int, a_stride: int):
    """dot(row, x, xr, a): the row's 256-weight blocks in order, each block(row, at, x[xr], .., a[xr], ..)
    with its float16 scales d and dmin read as _ROW_BLOCKS says; a[xr] holds a_stride floats per block
    (blocks.py says which)."""
    row_bytes, d_at, dmin_at = _ROW_BLOCKS[qtype]

    @njit(inline="always")
    def dot(row, x, xr, a):
        xrow, arow = x[xr], a[xr]
        acc = np.float32(0.0)
        for b in range(xrow.shape[0] // QK_K):
            at = b * row_bytes
            d = _half(row, at + d_at) if d_at >= 0 else np.float32(0.0)
            dmin = _half(row, at + dmin_at) if dmin_at >= 0 else np.float32(0.0)
            acc = _add_in_order(acc, block(row, at, xrow, b * QK_K, arow, b * a_stride, d, dmin))
        return acc

    return dot


_row_q4_k = _row_dot(blocks.q4_k_f32, QT.Q4_K, 8)
_row_q5_k = _row_dot(blocks.q5_k_f32, QT.Q5_K, 8)
_row_q6_k = _row_dot(blocks.q6_k_f32, QT.Q6_K, 8)
_row_q8_0 = _row_dot(blocks.q8_0_f32, QT.Q8_0, 8)


@njit(inline="always")
def _single_token(dot, w, sel, x, xs, out):
    """out (k, R)[j, r] = W[sel[0, j], r] . x[j if x has k rows else 0]: one token, its k experts (k = 1
    for a plain matvec). Work items are (expert slot, chunk of 16 rows). Expert ids are checked here,
    before any row is read (the block dots' loads are not bounds-checked)."""
    k = sel.shape[1]
    for j in range(k):
        if sel[0, j] < 0 or sel[0, j] >= w.shape[0]:
            raise IndexError("expert id out of range")
    rows = w.shape[1]
    n_chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for item in prange(k * n_chunks):
        j = item // n_chunks
        r0 = item % n_chunks * ROW_CHUNK
        e = sel[0, j]
        xr = j if x.shape[0] == k else 0
        for r in range(r0, min(rows, r0 + ROW_CHUNK)):
            out[j, r] = dot(w[e, r], x, xr, xs)


@njit(inline="always")
def _sums_of_32(x):
    """(m, C/32) float32 sums of each 32 inputs of x (m, C): the K-quants' mins term."""
    xs = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    for r in range(x.shape[0]):
        for g in range(xs.shape[1]):
            acc = np.float32(0.0)
            for i in range(32):
                acc += x[r, 32 * g + i]
            xs[r, g] = acc
    return xs


# w (E, R, RB) uint8; sel int32 (1, k); x f32 (1 or k, C), C a multiple of 256; out f32 (k, R)
@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q4_k(w, sel, x, out):
    _single_token(_row_q4_k, w, sel, x, _sums_of_32(x), out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q5_k(w, sel, x, out):
    _single_token(_row_q5_k, w, sel, x, _sums_of_32(x), out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q6_k(w, sel, x, out):
    _single_token(_row_q6_k, w, sel, x, x, out)  # (no mins: the last argument is not read)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q8_0(w, sel, x, out):
    _single_token(_row_q8_0, w, sel, x, x, out)


_VEC = {QT.Q4_K: _vec_q4_k, QT.Q5_K: _vec_q5_k, QT.Q6_K: _vec_q6_k, QT.Q8_0: _vec_q8_0}


class _Fast(NamedTuple):
    matmul: Callable
    rows: Callable
    dtype: type  # how the kernels read a row's bytes
    block: tuple[int, int]  # (elements, bytes)


_FAST: dict[int, _Fast] = {
    qt: _Fast(mm, rows, dt, block_layout(qt))
    for qt, mm, rows, dt in (
        (QT.F32, _matmul_f32, _rows_f32, np.float32),
        (QT.F16, _matmul_f16, _rows_f16, np.uint16),
        (QT.BF16, _matmul_bf16, _rows_bf16, np.uint16),
        (QT.Q8_0, _matmul_q8_0, _rows_q8_0, np.int8),
        (QT.Q4_K, _matmul_q4_k, _rows_q4_k, np.uint8),
        (QT.Q5_K, _matmul_q5_k, _rows_q5_k, np.uint8),
        (QT.Q6_K, _matmul_q6_k, _rows_q6_k, np.uint8),
    )
}


# ---------------------------------------------------------------------------------------------
# public wrappers: validate once (cheap checks), then dispatch by type
def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view: every kernel then has one signature (memmaps are read-only)."""
    if type(a) is np.ndarray and not a.flags.writeable:
        return a
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


def _check_f32(name: str, a: np.ndarray, shape: tuple, writeable: bool = False) -> None:
    if not (a.dtype == np.float32 and a.flags.c_contiguous and a.shape == shape):
        raise ValueError(f"{name} must be C-contiguous float32 {shape}, got {a.dtype} {a.shape}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only")


def _check_weights(qtype: int, w: np.ndarray, ndim: int, cols: int) -> _Fast | None:
    """The fast kernels of qtype (None for a gguf-py type); checks w is ndim-D raw rows of `cols` elements."""
    fast = _FAST.get(qtype)
    if fast is None and not readable(qtype):
        raise UnsupportedTypeError(f"no kernel reads tensors of type {type_name(qtype)}")
    elems, nbytes = fast.block if fast is not None else block_layout(qtype)
    if not (w.dtype == np.uint8 and w.ndim == ndim and w.flags.c_contiguous):
        raise ValueError(f"weights must be C-contiguous {ndim}-D uint8, got {w.dtype} {w.shape}")
    if cols % elems or w.shape[-1] != cols // elems * nbytes:
        raise ValueError(f"{type_name(qtype)} rows of {w.shape[-1]} bytes do not hold {cols} columns")
    return fast


_ZEROS = np.zeros((0, 1), np.int32)


def _zeros_sel(n: int) -> np.ndarray:
    """int32 (n, 1) zeros: a plain matmul is every token choosing expert 0 of a one-expert stack."""
    global _ZEROS
    if _ZEROS.shape[0] < n:
        _ZEROS = _readonly(np.zeros((max(n, 2 * _ZEROS.shape[0]), 1), np.int32))
    return _ZEROS[:n]


def _dequantize_chunk(qtype: int, raw: np.ndarray, cols: int) -> np.ndarray:
    """gguf-py's dequantize of raw rows (m, RB) -> float32 (m, cols)."""
    deq = gguf_dequantize(np.ascontiguousarray(raw), QT(qtype))
    return np.ascontiguousarray(deq, dtype=np.float32).reshape(-1, cols)


def _slow_matmul(qtype: int, w: np.ndarray, sel: np.ndarray, x: np.ndarray, kx: int, out: np.ndarray) -> None:
    """The grouped matmul for types without a fast kernel: gguf-py dequantizes a bounded chunk of an
    expert's rows, the F32 kernel multiplies it (so results match matvec bit for bit here too)."""
    k = sel.shape[1]
    rows, cols = w.shape[1], x.shape[1]
    step = max(1, SLOW_CHUNK_ELEMS // cols)
    flat = sel.ravel()
    for e in np.unique(flat):
        if not 0 <= e < w.shape[0]:
            raise IndexError(f"expert id {e} out of range [0, {w.shape[0]})")
        pairs = np.flatnonzero(flat == e)
        xe = _readonly(np.ascontiguousarray(x[pairs if kx == k else pairs // k]))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            deq = _readonly(_dequantize_chunk(qtype, w[e, r0:r1], cols)[None])
            tile = np.empty((pairs.shape[0], r1 - r0), np.float32)
            _matmul_f32(deq, _zeros_sel(pairs.shape[0]), xe, 1, tile)
            out[pairs, r0:r1] = tile


def _grouped(qtype: int, fast: _Fast | None, w: np.ndarray, sel: np.ndarray, x: np.ndarray, kx: int,
             out: np.ndarray, q8: bool = False) -> None:
    if fast is None:
        _slow_matmul(qtype, w, sel, x, kx, out)
    elif sel.shape[0] == 1 and qtype in _VEC and x.shape[1] % QK_K == 0:  # one token: decode
        if q8:
            from .cpu_q8 import kernel

            kernel(qtype)(_readonly(w), sel, _readonly(x), out)
        else:
            _VEC[qtype](_readonly(w), sel, _readonly(x), out)
    else:
        fast.matmul(_readonly(w).view(fast.dtype), sel, _readonly(x), kx, out)


def matmul(qtype: int, w: np.ndarray, x: np.ndarray, out: np.ndarray, *, q8: bool = False) -> None:
    """out (n, R) = x (n, C) @ W^T, W given as raw GGUF rows w: uint8 (R, RB); all float32.

    q8: a single token (n = 1) through those weights is multiplied with x quantized to 8 bits
    (engine/kernels/cpu_q8.py; the cpu-q8 backend's explicit fast mode); otherwise ignored.

    Row t of out does not depend on the other rows of x; it is bit-identical to matvec(qtype, w, x[t]) except
    for the types whose single token has its own kernel (Q4_K, Q5_K, Q6_K, Q8_0 with C a multiple of 256),
    where it agrees to rounding.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n, cols), got {x.shape}")
    n, cols = x.shape
    fast = _check_weights(qtype, w, 2, cols)
    _check_f32("x", x, (n, cols))
    _check_f32("out", out, (n, w.shape[0]), writeable=True)
    _grouped(qtype, fast, w.reshape((1,) + w.shape), _zeros_sel(n), x, 1, out, q8)


def matvec(qtype: int, w: np.ndarray, x: np.ndarray, out: np.ndarray, *, q8: bool = False) -> None:
    """out (R,) = W @ x (C,), W given as raw GGUF rows w: uint8 (R, RB); all float32."""
    if x.ndim != 1 or w.ndim != 2:
        raise ValueError(f"matvec takes 2-D w and 1-D x, got {w.shape} and {x.shape}")
    _check_f32("out", out, (w.shape[0],), writeable=True)  # before the reshape, which would copy a strided out
    matmul(qtype, w, x.reshape(1, -1), out.reshape(1, -1), q8=q8)


def expert_matmul(qtype: int, w: np.ndarray, sel: np.ndarray, x: np.ndarray, out: np.ndarray, *,
                  q8: bool = False) -> None:
    """out[t, j] = W[sel[t, j]] @ x[t, j if kx == k else 0]: all tokens and their k experts in one call.

    w: uint8 (E, R, RB) raw GGUF rows; sel: int (n, k) expert ids; x: float32 (n, kx, C) with kx == 1
    (one input for every expert of a token: gate, up) or kx == k (one per slot: down); out: float32 (n, k, R).
    Each out[t, j] equals matvec on expert sel[t, j] (bit for bit, as matmul's rows). q8: as matmul's.
    """
    if sel.ndim != 2 or x.ndim != 3 or x.shape[0] != sel.shape[0] or x.shape[1] not in (1, sel.shape[1]):
        raise ValueError(f"sel must be (n, k) and x (n, 1 or k, cols), got {sel.shape} and {x.shape}")
    n, k = sel.shape
    kx, cols = x.shape[1], x.shape[2]
    fast = _check_weights(qtype, w, 3, cols)
    _check_f32("x", x, (n, kx, cols))
    _check_f32("out", out, (n, k, w.shape[1]), writeable=True)
    sel = _readonly(np.ascontiguousarray(sel, dtype=np.int32))
    _grouped(qtype, fast, w, sel, x.reshape(n * kx, cols), kx, out.reshape(n * k, w.shape[1]), q8)


def get_rows(qtype: int, w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out (n, C) = the dequantized rows `ids` (n,) of w: uint8 (R, RB); the embedding lookup."""
    ids = _readonly(np.ascontiguousarray(ids, dtype=np.int64))
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got {ids.shape}")
    n, cols = ids.shape[0], out.shape[-1]
    fast = _check_weights(qtype, w, 2, cols)
    _check_f32("out", out, (n, cols), writeable=True)
    if n and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"row ids must lie in [0, {w.shape[0]})")
    if fast is not None:
        fast.rows(_readonly(w).view(fast.dtype), ids, out)
        return
    step = max(1, SLOW_CHUNK_ELEMS // cols)
    for t0 in range(0, n, step):
        out[t0:t0 + step] = _dequantize_chunk(qtype, w[ids[t0:t0 + step]], cols)


def dequantize_rows(qtype: int, w: np.ndarray, cols: int) -> np.ndarray:
    """float32 (R, C) of a 2-D raw block array w (R, RB); (E, R, C) of a 3-D one (E, R, RB)."""
    if w.ndim not in (2, 3):
        raise ValueError(f"weights must be 2-D or 3-D, got {w.shape}")
    flat = w.reshape(-1, w.shape[-1])
    out = np.empty((flat.shape[0], cols), np.float32)
    get_rows(qtype, flat, np.arange(flat.shape[0]), out)
    return out.reshape(w.shape[:-1] + (cols,))


# ---------------------------------------------------------------------------------------------
# softmax of a logit row without materialising it (the recorder wants the probabilities of its top-k)
@njit(cache=True)
def _softmax_parts(row):
    m = -np.inf
    for v in row:
        if np.isfinite(v) and v > m:
            m = np.float64(v)
    total = 0.0
    for v in row:
        if not np.isnan(v):
            total += math.exp(np.float64(v) - m)
    return m, total


def softmax_parts(row: np.ndarray) -> tuple[float, float]:
    """(max, denominator) of softmax(row) in float64: the largest finite value (-inf when there is none)
    and sum(exp(v - max)) over the values that are not NaN. p(v) = exp(v - max) / denominator."""
    return _softmax_parts(np.ascontiguousarray(row, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# activation statistics, reduced where the data is
def _stats_rows_py(x, out):  # x f32 (n, d); out f64 (n, 10) in STAT_FIELDS order
    for i in prange(x.shape[0]):
        n = 0
        nan = 0
        inf = 0
        zero = 0
        total = 0.0
        lo = np.inf
        hi = -np.inf
        for v in x[i]:
            if np.isnan(v):
                nan += 1
            elif np.isinf(v):
                inf += 1
            else:
                fv = np.float64(v)
                n += 1
                total += fv
                lo = min(lo, fv)
                hi = max(hi, fv)
                zero += fv == 0.0
        mean = total / n if n else np.nan
        dev2 = 0.0
        sq = 0.0
        for v in x[i]:
            if np.isfinite(v):
                fv = np.float64(v)
                dev2 += (fv - mean) * (fv - mean)
                sq += fv * fv
        out[i, 0] = x.shape[1]
        out[i, 1] = mean
        out[i, 2] = math.sqrt(dev2 / (n - 1)) if n > 1 else (0.0 if n == 1 else np.nan)
        out[i, 3] = lo if n else np.nan
        out[i, 4] = hi if n else np.nan
        out[i, 5] = math.sqrt(sq) if n else np.nan
        out[i, 6] = max(abs(lo), abs(hi)) if n else np.nan
        out[i, 7] = nan
        out[i, 8] = inf
        out[i, 9] = zero


# Rows are independent, so both give the same bits; waking the thread pool costs more than a decode
# step's few rows (0.2 ms a call), so small inputs take the serial one.
_stats_rows = njit(cache=True, parallel=True)(_stats_rows_py)
_stats_rows_serial = njit(cache=True)(_stats_rows_py)
STATS_PARALLEL_MIN = 1 << 16  # elements


def activation_stats(x: np.ndarray) -> np.ndarray:
    """float64 (10,) for x (d,), or (n, 10) for x (n, d), in STAT_FIELDS order.

    std_dev is the sample standard deviation (n - 1; 0.0 for a single finite value). mean, std_dev, min,
    max, l2_norm and abs_max are over the finite values (NaN when there are none); nan_count,
    inf_count and zero_count count elements; count is every element.
    """
    if x.ndim not in (1, 2):
        raise ValueError(f"activation_stats takes (d,) or (n, d), got {x.shape}")
    x2 = _readonly(np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x, dtype=np.float32))
    out = np.empty((x2.shape[0], len(STAT_FIELDS)), np.float64)
    (_stats_rows if x2.size >= STATS_PARALLEL_MIN and x2.shape[0] > 1 else _stats_rows_serial)(x2, out)
    return out[0] if x.ndim == 1 else out
