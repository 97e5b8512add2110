"""CUDA kernels (numba-cuda) for the forward pass, reading raw GGUF blocks in device memory.

The weights are on the GPU exactly as in the file (engine/quants.py has the block layouts; the CPU
kernels in engine/kernels/cpu.py read the same bytes the same way). Nothing dequantizes a tensor:
every matmul kernel dequantizes the bytes it is about to multiply, in registers.

A row of W is cut into *units*: 8 elements (F32, F16, BF16, Q8_0, Q4_K, Q5_K) or 16 (Q6_K), the
elements one thread unpacks from a few adjacent bytes of one block:

    F32/F16/BF16  8 consecutive elements
    Q8_0          a quarter of a 34-byte block: d (f16) and 8 int8 quants
    Q4_K          4 bytes of qs of group g (0..3) of a 144-byte block: their low nibbles are elements
                  64g + 4m .. + 3 (sub-block 2g), their high nibbles 64g + 32 + 4m .. + 3 (sub-block 2g + 1)
    Q5_K          as Q4_K, plus the fifth bits from qh (bit 2g and 2g + 1 of qh[4m .. 4m + 3])
    Q6_K          in half h (0, 1) of a 210-byte block, columns l = 4m .. 4m + 3 of its four 32-element
                  rows i = 0..3: a nibble of ql, two bits of qh, the scale of that 16-element group

so a warp's 32 lanes read 32 adjacent 4-byte words of quants (coalesced), and a 2048-wide Q4_K row is
256 units: 8 per lane.

Kernels and their thread mapping (g = Geometry: g.lanes threads per output row, g.rows rows per
block, g.tok_tile tokens per block, g.row_threads threads per block of the row-wise kernels):

    matmul    out (n, R) = x (n, C) @ W^T. Block (bx, by): rows bx*g.rows .. + g.rows, tokens
              by*g.tok_tile .. + g.tok_tile. Each row's g.lanes lanes stride over its units, unpack a
              unit once and multiply it with every token of the tile (decode is the case n = 1), then
              the lanes' partial sums meet in shared memory and are added in lane order (no atomics:
              the result does not depend on timing).
    experts   the same for W (E, R, C), over the (token, slot) pairs grouped by expert: block (bx, y)
              serves the y-th active expert, whose id and pair list the route kernel left in device
              memory, so all of a layer's experts run in one launch with no trip to the host.
    rows      the embedding lookup: one block per token, threads over units.
    rmsnorm   one block per row (a token, or a token's head for the per-head Q/K norm).
    rope      one thread per (token, head, pair of elements).
    kv_write  one thread per element of the new keys and values.
    attention one block per (token, query head), online softmax over the causal positions in chunks
              of g.row_threads (one score per thread), each thread owning head_dim / g.row_threads of
              the output; the KV head is head // (n_heads / n_kv_heads).
    route     one block: softmax, top-k and renormalisation per token (a thread per token), then the
              pairs are grouped by expert (counts, starts, active experts, stable pair order).
    swiglu, weighted_sum, add, copy_cols: one thread per output element.
    stats     one block per row: the ten STAT_FIELDS reduced in shared memory (float64).

Floating point: float32 everywhere, as on the CPU; sums run in a fixed order, so reruns are
bit-identical. Results match the CPU kernels to float32 rounding, not bit for bit (the CPU sums each
dot product in a different order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import cuda

from ..quants import QT

HD_MAX = 256  # the largest head_dim the attention kernel holds in shared memory


class Geometry(NamedTuple):
    """Launch shapes. GPU is what a GPU runs; SIMULATOR keeps numba-cuda's simulator (one Python thread
    per CUDA thread) fast enough for CI. The kernels are the same code for both."""

    lanes: int  # threads that share one output row of a matmul: a warp
    rows: int  # output rows per matmul block
    tok_tile: int  # tokens (or expert pairs) per matmul block
    row_threads: int  # threads of a row-wise block (rmsnorm, attention, route, stats); a power of two
    elem_threads: int  # threads of an elementwise block
    elem_blocks: int  # at most this many elementwise blocks (grid-stride loops do the rest)


GPU = Geometry(lanes=32, rows=4, tok_tile=8, row_threads=128, elem_threads=256, elem_blocks=4096)
SIMULATOR = Geometry(lanes=1, rows=8, tok_tile=4, row_threads=4, elem_threads=32, elem_blocks=1)


# ---------------------------------------------------------------------------------------------
# scalar decoders (integer arithmetic and ldexp: exact, and the same in the simulator)
@cuda.jit(device=True, inline=True)
def _float16bits(h, mbits, bias):
    """A 16-bit float with a sign, 15 - mbits exponent bits (bias `bias`) and mbits mantissa bits, given as
    an integer -> float32: subnormals, inf and nan included."""
    h = np.int32(h)
    emax = (1 << (15 - mbits)) - 1
    e = (h >> mbits) & emax
    m = h & ((1 << mbits) - 1)
    if e == 0:
        v = np.float32(math.ldexp(np.float32(m), 1 - bias - mbits))
    elif e == emax:
        v = np.float32(math.inf) if m == 0 else np.float32(math.nan)
    else:
        v = np.float32(math.ldexp(np.float32(m + (1 << mbits)), int(e) - bias - mbits))
    return -v if h & 0x8000 else v


@cuda.jit(device=True, inline=True)
def f16_to_f32(h):
    """IEEE half given as its 16 bits (an integer) -> float32."""
    return _float16bits(h, 10, 15)


@cuda.jit(device=True, inline=True)
def bf16_to_f32(h):
    """bfloat16 given as its 16 bits -> float32 (the upper half of a float32)."""
    return _float16bits(h, 7, 127)


@cuda.jit(device=True, inline=True)
def _half(w, e, r, off):
    """The little-endian f16 at byte `off` of row r of expert e, as float32."""
    return f16_to_f32(np.int32(w[e, r, off]) | (np.int32(w[e, r, off + 1]) << 8))


@cuda.jit(device=True, inline=True)
def _i8(byte):
    v = np.int32(byte)
    return np.float32(v - 256 if v > 127 else v)


@cuda.jit(device=True, inline=True)
def _scale_min_k4(w, e, r, at, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at w[e, r, at:at + 12]
    (the layout is drawn in engine/kernels/cpu.py `_scale_min_k4`)."""
    if j < 4:
        sc = np.int32(w[e, r, at + j]) & 63
        m = np.int32(w[e, r, at + j + 4]) & 63
    else:
        sc = (np.int32(w[e, r, at + j + 4]) & 0xF) | ((np.int32(w[e, r, at + j - 4]) >> 6) << 4)
        m = (np.int32(w[e, r, at + j + 4]) >> 4) | ((np.int32(w[e, r, at + j]) >> 6) << 4)
    return np.float32(sc), np.float32(m)


# ---------------------------------------------------------------------------------------------
# unit dequantizers: deq(w, e, r, u, vals) writes the unit's elements to vals[0:UNIT];
# col(u, j) is the column of vals[j]. w is (E, R, row) in the element type of the tensor's view.
@cuda.jit(device=True, inline=True)
def _deq_f32(w, e, r, u, vals):
    for j in range(8):
        vals[j] = w[e, r, 8 * u + j]


@cuda.jit(device=True, inline=True)
def _deq_f16(w, e, r, u, vals):
    for j in range(8):
        vals[j] = f16_to_f32(w[e, r, 8 * u + j])


@cuda.jit(device=True, inline=True)
def _deq_bf16(w, e, r, u, vals):
    for j in range(8):
        vals[j] = bf16_to_f32(w[e, r, 8 * u + j])


@cuda.jit(device=True, inline=True)
def _col_8(u, j):
    return 8 * u + j


@cuda.jit(device=True, inline=True)
def _deq_q8_0(w, e, r, u, vals):
    # block u // 4 (d:f16, qs:int8[32]); this unit is its quants 8 (u % 4) .. + 7
    base = (u // 4) * 34
    d = _half(w, e, r, base)
    q0 = base + 2 + 8 * (u % 4)
    for j in range(8):
        vals[j] = d * _i8(w[e, r, q0 + j])


@cuda.jit(device=True, inline=True)
def _k_group_scales(w, e, r, base, g):
    """Q4_K / Q5_K block at `base`: (d * scale, dmin * min) of sub-blocks 2g and 2g + 1."""
    d = _half(w, e, r, base)
    dmin = _half(w, e, r, base + 2)
    sc1, m1 = _scale_min_k4(w, e, r, base + 4, 2 * g)
    sc2, m2 = _scale_min_k4(w, e, r, base + 4, 2 * g + 1)
    return d * sc1, dmin * m1, d * sc2, dmin * m2


@cuda.jit(device=True, inline=True)
def _deq_q4_k(w, e, r, u, vals):
    # block u // 32 (d, dmin, scales[12], qs[128]); v = u % 32 -> group g = v // 8, bytes 4m .. 4m + 3
    base = (u // 32) * 144
    g, m = u % 32 // 8, u % 8
    d1, dm1, d2, dm2 = _k_group_scales(w, e, r, base, g)
    qs = base + 16 + 32 * g + 4 * m
    for j in range(4):
        q = np.int32(w[e, r, qs + j])
        vals[j] = d1 * np.float32(q & 0xF) - dm1
        vals[4 + j] = d2 * np.float32(q >> 4) - dm2


@cuda.jit(device=True, inline=True)
def _col_q4_k(u, j):
    v = u % 32
    return (u // 32) * 256 + 64 * (v // 8) + 4 * (v % 8) + (j % 4) + 32 * (j // 4)


@cuda.jit(device=True, inline=True)
def _deq_q5_k(w, e, r, u, vals):
    # as Q4_K with qh[32] before qs: bit 2g of qh[l] is the fifth bit of element l of sub-block 2g
    base = (u // 32) * 176
    g, m = u % 32 // 8, u % 8
    d1, dm1, d2, dm2 = _k_group_scales(w, e, r, base, g)
    qs = base + 48 + 32 * g + 4 * m
    qh = base + 16 + 4 * m
    for j in range(4):
        q = np.int32(w[e, r, qs + j])
        h = np.int32(w[e, r, qh + j]) >> (2 * g)
        vals[j] = d1 * np.float32((q & 0xF) | ((h & 1) << 4)) - dm1
        vals[4 + j] = d2 * np.float32((q >> 4) | ((h & 2) << 3)) - dm2


@cuda.jit(device=True, inline=True)
def _deq_q6_k(w, e, r, u, vals):
    # block u // 16 (ql[128], qh[64], scales:int8[16], d:f16); v = u % 16 -> half hh = v // 8, l = 4m + jj.
    # Element 128 hh + 32 i + l: nibble i // 2 of ql[64 hh + 32 (i % 2) + l] | bits 2i, 2i+1 of qh[32 hh + l]
    # << 4, minus 32, times d * scales[8 hh + 2 i + l // 16].
    base = (u // 16) * 210
    v = u % 16
    hh = v // 8
    m = v % 8
    d = _half(w, e, r, base + 208)
    at = base + 192 + 8 * hh + m // 4
    d0, d1, d2, d3 = d * _i8(w[e, r, at]), d * _i8(w[e, r, at + 2]), d * _i8(w[e, r, at + 4]), d * _i8(w[e, r, at + 6])
    ql = base + 64 * hh + 4 * m
    qh = base + 128 + 32 * hh + 4 * m
    for jj in range(4):
        lo = np.int32(w[e, r, ql + jj])
        hi = np.int32(w[e, r, ql + 32 + jj])
        hb = np.int32(w[e, r, qh + jj])
        vals[jj] = d0 * np.float32(((lo & 0xF) | ((hb << 4) & 0x30)) - 32)
        vals[4 + jj] = d1 * np.float32(((hi & 0xF) | ((hb << 2) & 0x30)) - 32)
        vals[8 + jj] = d2 * np.float32(((lo >> 4) | (hb & 0x30)) - 32)
        vals[12 + jj] = d3 * np.float32(((hi >> 4) | ((hb >> 2) & 0x30)) - 32)


@cuda.jit(device=True, inline=True)
def _col_q6_k(u, j):
    v = u % 16
    return (u // 16) * 256 + 128 * (v // 8) + 32 * (j // 4) + 4 * (v % 8) + (j % 4)


class TypeKernels(NamedTuple):
    view: type  # the element type the weights are read as
    unit: int  # elements per unit
    cols_multiple: int  # a row's length must be a multiple of this
    matmul: object
    experts: object
    rows: object


# qtype -> (deq, col, unit, view dtype, row multiple)
_UNITS = {
    QT.F32: (_deq_f32, _col_8, 8, np.float32, 8),
    QT.F16: (_deq_f16, _col_8, 8, np.uint16, 8),
    QT.BF16: (_deq_bf16, _col_8, 8, np.uint16, 8),
    QT.Q8_0: (_deq_q8_0, _col_8, 8, np.uint8, 32),
    QT.Q4_K: (_deq_q4_k, _col_q4_k, 8, np.uint8, 256),
    QT.Q5_K: (_deq_q5_k, _col_q4_k, 8, np.uint8, 256),
    QT.Q6_K: (_deq_q6_k, _col_q6_k, 16, np.uint8, 256),
}
CUDA_TYPES = frozenset(_UNITS)


def _make_type_kernels(qtype: int, g: Geometry) -> TypeKernels:
    deq, col, UNIT, view, multiple = _UNITS[QT(qtype)]
    LANES, ROWS, TT = g.lanes, g.rows, g.tok_tile

    @cuda.jit(device=True, inline=True)
    def _tile_dot(w, e, r, x, xrows, nt, lane, acc, vals):
        # acc[t] = this lane's share of W[e, r] . x[xrows[t]] for the nt tokens of the tile
        for t in range(TT):
            acc[t] = np.float32(0.0)
        if nt == 0:
            return
        units = x.shape[1] // UNIT
        for u in range(lane, units, LANES):
            deq(w, e, r, u, vals)  # unpacked once, used by every token of the tile
            for t in range(TT):  # a constant trip count keeps acc, xrows and vals in registers
                if t < nt:
                    xr = xrows[t]
                    s = np.float32(0.0)
                    for j in range(UNIT):
                        s += vals[j] * x[xr, col(u, j)]
                    acc[t] += s

    @cuda.jit(device=True, inline=True)
    def _lanes_sum(part, rr, lane, acc, nt, out, orows, r, valid):
        # the lanes of row rr meet in shared memory; lane t adds token t's partials in lane order
        for t in range(TT):
            part[rr, t, lane] = acc[t]
        cuda.syncthreads()
        if valid:
            for t in range(lane, nt, LANES):
                s = np.float32(0.0)
                for q in range(LANES):
                    s += part[rr, t, q]
                out[orows[t], r] = s
        cuda.syncthreads()

    @cuda.jit
    def matmul_kernel(w, x, out):
        # w (1, R, row); x (n, C); out (n, R). Block: rows bx*ROWS.., tokens by*TT..
        tid = cuda.threadIdx.x
        lane = tid % LANES
        rr = tid // LANES
        r = cuda.blockIdx.x * ROWS + rr
        t0 = cuda.blockIdx.y * TT
        nt = min(TT, x.shape[0] - t0)
        valid = r < out.shape[1]
        part = cuda.shared.array((ROWS, TT, LANES), np.float32)
        acc = cuda.local.array(TT, np.float32)
        vals = cuda.local.array(UNIT, np.float32)
        rows = cuda.local.array(TT, np.int32)
        for t in range(TT):
            rows[t] = t0 + t if t < nt else 0
        _tile_dot(w, 0, r if valid else 0, x, rows, nt if valid else 0, lane, acc, vals)
        _lanes_sum(part, rr, lane, acc, nt, out, rows, r, valid)

    @cuda.jit
    def experts_kernel(w, x, k, kx, starts, order, active, n_active, out):
        # w (E, R, row); x (n * kx, C); out (n * k, R): out[p] = W[e] . x[p if kx == k else p // k] for
        # the pairs p of expert e = active[blockIdx.y], which are order[starts[e]:starts[e + 1]]
        if cuda.blockIdx.y >= n_active[0]:
            return  # the whole block: fewer experts are active than the grid allows for
        tid = cuda.threadIdx.x
        lane = tid % LANES
        rr = tid // LANES
        r = cuda.blockIdx.x * ROWS + rr
        valid = r < out.shape[1]
        e = active[cuda.blockIdx.y]
        p0 = starts[e]
        m = starts[e + 1] - p0
        part = cuda.shared.array((ROWS, TT, LANES), np.float32)
        acc = cuda.local.array(TT, np.float32)
        vals = cuda.local.array(UNIT, np.float32)
        xrows = cuda.local.array(TT, np.int32)
        prows = cuda.local.array(TT, np.int32)
        for t0 in range(0, m, TT):
            nt = min(TT, m - t0)
            for t in range(TT):
                p = order[p0 + t0 + t] if t < nt else 0
                prows[t] = p
                xrows[t] = p if kx == k else p // k
            _tile_dot(w, e, r if valid else 0, x, xrows, nt if valid else 0, lane, acc, vals)
            _lanes_sum(part, rr, lane, acc, nt, out, prows, r, valid)

    @cuda.jit
    def rows_kernel(w, ids, out):
        # the embedding lookup: out (n, C)[t] = W[ids[t]] dequantized
        t = cuda.blockIdx.x
        row = ids[t]
        vals = cuda.local.array(UNIT, np.float32)
        for u in range(cuda.threadIdx.x, out.shape[1] // UNIT, cuda.blockDim.x):
            deq(w, 0, row, u, vals)
            for j in range(UNIT):
                out[t, col(u, j)] = vals[j]

    return TypeKernels(view, UNIT, multiple, matmul_kernel, experts_kernel, rows_kernel)


# ---------------------------------------------------------------------------------------------
# block reductions (shared memory trees, log2(threads) + 2 barriers; every thread gets the result)
@cuda.jit(device=True, inline=True)
def _block_sum(buf, tid, nthreads, v):
    buf[tid] = v
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if tid < s:
            buf[tid] += buf[tid + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True, inline=True)
def _block_max(buf, tid, nthreads, v):
    buf[tid] = v
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if tid < s:
            buf[tid] = max(buf[tid], buf[tid + s])
        cuda.syncthreads()
        s //= 2
    top = buf[0]
    cuda.syncthreads()
    return top


class RowKernels(NamedTuple):
    rmsnorm: object
    rope: object
    kv_write: object
    attention: object
    route: object
    swiglu: object
    weighted_sum: object
    add: object
    copy_cols: object
    stats: object
    copy_positions: object


def _make_row_kernels(g: Geometry) -> RowKernels:
    RT = g.row_threads
    DPT = (HD_MAX + RT - 1) // RT  # output dims of a head per attention thread

    @cuda.jit
    def rmsnorm_kernel(x, w, eps, out):
        # x, out (rows, d); w (d,): out = w * (x / sqrt(mean(x^2) + eps)), as HF (float32)
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        d = x.shape[1]
        buf = cuda.shared.array(RT, np.float32)
        s = np.float32(0.0)
        for c in range(tid, d, RT):
            v = x[row, c]
            s += v * v
        total = _block_sum(buf, tid, RT, s)
        scale = np.float32(1.0) / np.float32(math.sqrt(total / np.float32(d) + eps))
        for c in range(tid, d, RT):
            out[row, c] = w[c] * (x[row, c] * scale)

    @cuda.jit
    def rope_kernel(x, cos, sin, out):
        # x, out (n, heads, hd); cos, sin (n, hd/2): [a, b] -> [a cos - b sin, b cos + a sin] per head
        heads, half = x.shape[1], x.shape[2] // 2
        total = x.shape[0] * heads * half
        for i in range(cuda.grid(1), total, cuda.gridsize(1)):
            t = i // (heads * half)
            hh = (i // half) % heads
            j = i % half
            a = x[t, hh, j]
            b = x[t, hh, j + half]
            c = cos[t, j]
            s = sin[t, j]
            out[t, hh, j] = a * c - b * s
            out[t, hh, j + half] = b * c + a * s

    @cuda.jit
    def kv_write_kernel(k, v, kc, vc, layer, p0):
        # k, v (n, kvh, hd) -> kc, vc (L, T, kvh, hd) at positions p0 .. p0 + n - 1 of `layer`
        kvh, hd = k.shape[1], k.shape[2]
        total = k.shape[0] * kvh * hd
        for i in range(cuda.grid(1), total, cuda.gridsize(1)):
            t = i // (kvh * hd)
            hh = (i // hd) % kvh
            d = i % hd
            kc[layer, p0 + t, hh, d] = k[t, hh, d]
            vc[layer, p0 + t, hh, d] = v[t, hh, d]

    @cuda.jit
    def attention_kernel(q, kc, vc, layer, p0, scale, out):
        # block (t, head): out[t, head] = softmax(q k^T * scale) v over positions 0 .. p0 + t, online:
        # a chunk of RT positions at a time (one score per thread), rescaling what came before
        t = cuda.blockIdx.x
        head = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        hd = q.shape[2]
        kvh = head // (q.shape[1] // kc.shape[2])
        last = p0 + t
        qs = cuda.shared.array(HD_MAX, np.float32)
        probs = cuda.shared.array(RT, np.float32)
        buf = cuda.shared.array(RT, np.float32)
        acc = cuda.local.array(DPT, np.float32)
        for i in range(DPT):
            acc[i] = np.float32(0.0)
        for d in range(tid, hd, RT):
            qs[d] = q[t, head, d]
        cuda.syncthreads()
        m = np.float32(-math.inf)
        denom = np.float32(0.0)
        for c0 in range(0, last + 1, RT):
            s = c0 + tid
            score = np.float32(-math.inf)
            if s <= last:
                dot = np.float32(0.0)
                for d in range(hd):
                    dot += qs[d] * kc[layer, s, kvh, d]
                score = dot * scale
            m_new = max(m, _block_max(buf, tid, RT, score))
            p = np.float32(math.exp(score - m_new)) if s <= last else np.float32(0.0)
            probs[tid] = p
            alpha = np.float32(math.exp(m - m_new))
            denom = denom * alpha + _block_sum(buf, tid, RT, p)  # its barriers also publish probs
            count = min(RT, last + 1 - c0)
            for i in range(DPT):
                d = tid + i * RT
                if d < hd:
                    a = acc[i] * alpha
                    for j in range(count):
                        a += probs[j] * vc[layer, c0 + j, kvh, d]
                    acc[i] = a
            m = m_new
            cuda.syncthreads()  # probs is rewritten by the next chunk
        for i in range(DPT):
            d = tid + i * RT
            if d < hd:
                out[t, head, d] = acc[i] / denom

    @cuda.jit
    def route_kernel(logits, k, norm, probs, sel, wts, starts, order, active, n_active):
        # One block. Per token (a thread each): routing_weights = softmax(router_logits); the k most
        # probable experts, descending, ties to the lower id; their weights renormalised when `norm`.
        # Then the n*k pairs p = t*k + j are grouped by expert for the experts kernel: starts (E + 1),
        # a stable pair order, the active experts in id order and their count.
        tid = cuda.threadIdx.x
        n, E = logits.shape
        for t in range(tid, n, RT):
            mx = logits[t, 0]
            for e in range(1, E):
                mx = max(mx, logits[t, e])
            tot = np.float32(0.0)
            for e in range(E):
                v = np.float32(math.exp(logits[t, e] - mx))
                probs[t, e] = v
                tot += v
            for e in range(E):
                probs[t, e] = probs[t, e] / tot
            pv = np.float32(math.inf)
            pe = -1
            wsum = np.float32(0.0)
            for j in range(k):
                bv = np.float32(0.0)
                be = -1
                for e in range(E):
                    v = probs[t, e]
                    if (v < pv or (v == pv and e > pe)) and (be < 0 or v > bv):
                        bv = v
                        be = e
                if be < 0:  # NaN probabilities: any valid id (the non-finite check reports the NaN)
                    be = j
                    bv = probs[t, j]
                sel[t, j] = be
                wts[t, j] = bv
                wsum += bv
                pv = bv
                pe = be
            if norm:
                for j in range(k):
                    wts[t, j] = wts[t, j] / wsum
        cuda.syncthreads()
        P = n * k
        for e in range(tid, E, RT):
            c = 0
            for p in range(P):
                if sel[p // k, p % k] == e:
                    c += 1
            starts[e + 1] = c
        cuda.syncthreads()
        if tid == 0:
            starts[0] = 0
            na = 0
            for e in range(E):
                c = starts[e + 1]
                starts[e + 1] = starts[e] + c
                if c > 0:
                    active[na] = e
                    na += 1
            n_active[0] = na
        cuda.syncthreads()
        for e in range(tid, E, RT):
            at = starts[e]
            for p in range(P):
                if sel[p // k, p % k] == e:
                    order[at] = p
                    at += 1

    @cuda.jit
    def swiglu_kernel(gate, up, out):
        # flat arrays: out = silu(gate) * up, silu(x) = x / (1 + exp(-x))
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            g_ = gate[i]
            out[i] = g_ / (np.float32(1.0) + np.float32(math.exp(-g_))) * up[i]

    @cuda.jit
    def weighted_sum_kernel(wts, down, out):
        # wts (n, k), down (n, k, H) -> out (n, H) = sum_j wts[t, j] * down[t, j]
        n, k, H = down.shape
        for i in range(cuda.grid(1), n * H, cuda.gridsize(1)):
            t = i // H
            c = i % H
            s = np.float32(0.0)
            for j in range(k):
                s += wts[t, j] * down[t, j, c]
            out[t, c] = s

    @cuda.jit
    def add_kernel(x, y, out):
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[i] = x[i] + y[i]

    @cuda.jit
    def copy_cols_kernel(src, dst, c0):
        # dst[:, c0:c0 + src.shape[1]] = src
        n, c = src.shape
        for i in range(cuda.grid(1), n * c, cuda.gridsize(1)):
            dst[i // c, c0 + i % c] = src[i // c, i % c]

    @cuda.jit
    def copy_positions_kernel(src, dst, length):
        # dst[:, :length] = src[:, :length] for caches (L, T, kvh, hd) of different T
        L, _, kvh, hd = src.shape
        per = kvh * hd
        for i in range(cuda.grid(1), L * length * per, cuda.gridsize(1)):
            layer = i // (length * per)
            pos = (i // per) % length
            j = i % per
            dst[layer, pos, j // hd, j % hd] = src[layer, pos, j // hd, j % hd]

    @cuda.jit
    def stats_kernel(x, out):
        # out (rows, 10) float64 in STAT_FIELDS order for x (rows, d); the CPU's activation_stats
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        d = x.shape[1]
        fsum = cuda.shared.array(RT, np.float64)
        flo = cuda.shared.array(RT, np.float64)
        fhi = cuda.shared.array(RT, np.float64)
        icnt = cuda.shared.array(RT, np.int64)
        inan = cuda.shared.array(RT, np.int64)
        iinf = cuda.shared.array(RT, np.int64)
        izero = cuda.shared.array(RT, np.int64)
        cnt = 0
        nan = 0
        inf = 0
        zero = 0
        tot = 0.0
        lo = math.inf
        hi = -math.inf
        for c in range(tid, d, RT):
            v = x[row, c]
            if math.isnan(v):
                nan += 1
            elif math.isinf(v):
                inf += 1
            else:
                fv = np.float64(v)
                cnt += 1
                tot += fv
                lo = min(lo, fv)
                hi = max(hi, fv)
                if fv == 0.0:
                    zero += 1
        fsum[tid] = tot
        flo[tid] = lo
        fhi[tid] = hi
        icnt[tid] = cnt
        inan[tid] = nan
        iinf[tid] = inf
        izero[tid] = zero
        cuda.syncthreads()
        s = RT // 2
        while s > 0:
            if tid < s:
                fsum[tid] += fsum[tid + s]
                flo[tid] = min(flo[tid], flo[tid + s])
                fhi[tid] = max(fhi[tid], fhi[tid + s])
                icnt[tid] += icnt[tid + s]
                inan[tid] += inan[tid + s]
                iinf[tid] += iinf[tid + s]
                izero[tid] += izero[tid + s]
            cuda.syncthreads()
            s //= 2
        n_ok = icnt[0]
        mean = fsum[0] / n_ok if n_ok > 0 else math.nan
        lo, hi = flo[0], fhi[0]
        dev2 = 0.0
        sq = 0.0
        for c in range(tid, d, RT):
            v = x[row, c]
            if not (math.isnan(v) or math.isinf(v)):
                fv = np.float64(v)
                dev2 += (fv - mean) * (fv - mean)
                sq += fv * fv
        cuda.syncthreads()  # everyone has read the first round's totals before the buffers are reused
        fsum[tid] = dev2
        flo[tid] = sq
        cuda.syncthreads()
        s = RT // 2
        while s > 0:
            if tid < s:
                fsum[tid] += fsum[tid + s]
                flo[tid] += flo[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            out[row, 0] = d
            out[row, 1] = mean
            if n_ok > 1:
                out[row, 2] = math.sqrt(fsum[0] / (n_ok - 1))
            elif n_ok == 1:
                out[row, 2] = 0.0
            else:
                out[row, 2] = math.nan
            out[row, 3] = lo if n_ok > 0 else math.nan
            out[row, 4] = hi if n_ok > 0 else math.nan
            out[row, 5] = math.sqrt(flo[0]) if n_ok > 0 else math.nan
            out[row, 6] = max(abs(lo), abs(hi)) if n_ok > 0 else math.nan
            out[row, 7] = inan[0]
            out[row, 8] = iinf[0]
            out[row, 9] = izero[0]

    return RowKernels(rmsnorm_kernel, rope_kernel, kv_write_kernel, attention_kernel, route_kernel, swiglu_kernel,
                      weighted_sum_kernel, add_kernel, copy_cols_kernel, stats_kernel,
                      copy_positions_kernel)


_TYPE_CACHE: dict = {}
_ROW_CACHE: dict = {}


def type_kernels(qtype: int, g: Geometry) -> TypeKernels:
    """The matmul, experts and rows kernels of one type for geometry g (compiled on first launch)."""
    key = (int(qtype), g)
    if key not in _TYPE_CACHE:
        _TYPE_CACHE[key] = _make_type_kernels(qtype, g)
    return _TYPE_CACHE[key]


def row_kernels(g: Geometry) -> RowKernels:
    if g not in _ROW_CACHE:
        _ROW_CACHE[g] = _make_row_kernels(g)
    return _ROW_CACHE[g]
