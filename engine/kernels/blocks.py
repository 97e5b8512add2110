"""Whole-block dot products of Q4_K, Q5_K, Q6_K and Q8_0 rows, written as LLVM IR (Numba intrinsics).

A single token's product (a decode step) reads each weight once, so its speed is how fast a 256-weight
block can be unpacked and multiplied. Left to the auto-vectoriser, the unpacking (shifts, masks and
conversions per weight) ran at about 4 billion weights/s on two cores, a third of the memory's pace.
Here each block is straight-line vector code: the codes of 32 weights are unpacked at once as a
<32 x i8> vector (one shift and one mask for 32 weights), then either

- converted to float and multiplied with the float32 input (`*_f32`, the default `cpu` backend: the
  products are the float32 path's, only the summation order differs from the batch kernels'), or
- multiplied with 8-bit input codes in integers (`*_q8`, the `cpu-q8` backend: AVX2 `vpmaddubsw`, then
  `vpmaddwd` applies the sub-block scales; engine/kernels/cpu_q8.py).

Every block intrinsic has the signature (row, base, x, xo, a, ai, d, dmin) -> float32: the block at byte
`base` of the uint8 weight row, dotted with x[xo:xo + 256]. `a` holds per-32-input figures of the
block at a[ai:]: on the float path the 8 sums of x (Q4_K's mins), for q8 the 8 input scales followed
by the 8 sums of the dequantized inputs. d and dmin are the block's float16 scales, decoded by the
caller (cpu._row_dot). Sums are in an order fixed when the kernel compiles. The generic IR (everything
but the `_q8` products) compiles for any target LLVM supports.

Numba's on-disk cache checks the source file of each cached kernel (cpu.py, cpu_q8.py), not of the
intrinsics they inline: after editing this file, touch those two (or clear their __pycache__).

Block layouts as in ggml-common.h: Q4_K is d, dmin (f16), 12 bytes of packed 6-bit scales and mins,
128 bytes of nibbles (32 bytes per 64 weights: low nibbles the first 32, high nibbles the next 32);
Q6_K is 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales (one per 16 weights), d.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants import QK_K

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
V8x32 = ir.VectorType(I8, 32)
V8x8 = ir.VectorType(I8, 8)
V16x16 = ir.VectorType(I16, 16)
V16x8 = ir.VectorType(I16, 8)
V32x8 = ir.VectorType(I32, 8)
F32x8 = ir.VectorType(ir.FloatType(), 8)


class BlockIR:
    """Builds a block's IR inside an intrinsic's codegen; array arguments are addressed by position."""

    def __init__(self, context, builder, sig, args):
        self.context, self.b = context, builder
        self.arrays = {i: (t, a) for i, (t, a) in enumerate(zip(sig.args, args)) if isinstance(t, types.Array)}

    def fn(self, name: str, ret, argtys):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, argtys), name)

    def at(self, arg: int, offset, plus: int = 0):
        """Pointer to element `offset + plus` of the 1-D array argument number `arg`."""
        aryty, ary = self.arrays[arg]
        data = self.context.make_array(aryty)(self.context, self.b, ary).data
        if plus:
            offset = self.b.add(offset, ir.Constant(offset.type, plus))
        return self.b.gep(data, [offset])

    def load(self, ptr, vty):
        return self.b.load(self.b.bitcast(ptr, vty.as_pointer()), align=1)

    def bytes32(self, v: int):
        return ir.Constant(V8x32, [v] * 32)

    def shuffle(self, a, b, idx):
        return self.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, len(idx)), idx))

    def splat(self, v):
        one = self.b.insert_element(ir.Constant(F32x8, ir.Undefined), v, ir.Constant(I32, 0))
        return self.shuffle(one, one, [0] * 8)

    def lane(self, v, i: int):
        return self.b.extract_element(v, ir.Constant(I32, i))

    def muladd(self, a, b, c):
        """a * b + c on <8 x float>, fused where the target can."""
        return self.b.call(self.fn("llvm.fmuladd.v8f32", F32x8, [F32x8] * 3), [a, b, c])

    def tree(self, vs):
        """(v0 + v1) + (v2 + v3): independent accumulators summed pairwise."""
        while len(vs) > 1:
            vs = [self.b.fadd(vs[i], vs[i + 1]) for i in range(0, len(vs), 2)]
        return vs[0]

    def hsum(self, v):
        """Sum of the 8 lanes, in a fixed order: halves, then pairs, then the last two."""
        s = self.b.fadd(self.shuffle(v, v, [0, 1, 2, 3]), self.shuffle(v, v, [4, 5, 6, 7]))
        s = self.b.fadd(self.shuffle(s, s, [0, 1]), self.shuffle(s, s, [2, 3]))
        return self.b.fadd(self.lane(s, 0), self.lane(s, 1))

    # -- unpacking --------------------------------------------------------------------------------
    def q4_k_scales(self, base):
        """(scales, mins) of the 8 sub-blocks as <8 x float>, from the 12 packed bytes at base + 4.
        Sub-block j < 4: byte j & 63 and byte j + 4 & 63; j >= 4: the low / high nibble of byte j + 4, with
        the top two bits of byte j - 4 (scale) / byte j (min) above them."""
        b = self.b
        lo8 = self.load(self.at(0, base, 4), V8x8)  # bytes 0..7
        hi8 = self.load(self.at(0, base, 8), V8x8)  # bytes 4..11
        mask = ir.Constant(V8x8, [63] * 4 + [15] * 4)
        top = ir.Constant(V8x8, [0] * 4 + [0x30] * 4)
        six, four = ir.Constant(V8x8, [6] * 8), ir.Constant(V8x8, [4] * 8)
        sc = b.or_(b.and_(self.shuffle(lo8, hi8, [0, 1, 2, 3, 12, 13, 14, 15]), mask),
                   b.and_(b.shl(b.lshr(self.shuffle(lo8, lo8, [0, 1, 2, 3, 0, 1, 2, 3]), six), four), top))
        mn = b.or_(b.and_(b.lshr(self.shuffle(lo8, hi8, [4, 5, 6, 7, 12, 13, 14, 15]),
                                 ir.Constant(V8x8, [0] * 4 + [4] * 4)), mask),
                   b.and_(b.shl(b.lshr(self.shuffle(lo8, lo8, [4, 5, 6, 7, 4, 5, 6, 7]), six), four), top))
        return b.uitofp(sc, F32x8), b.uitofp(mn, F32x8)

    def k_codes(self, base, k: int, qs_at: int, qh_at: int | None):
        """Codes of groups 2k and 2k + 1 (<32 x i8> each): the low and high nibbles of the 32 bytes at
        qs_at + 32k; Q5_K (qh_at given) adds bit 2k, resp. 2k + 1, of the 32 bytes at qh_at as bit 4."""
        b = self.b
        q = self.load(self.at(0, base, qs_at + 32 * k), V8x32)
        lo, hi = b.and_(q, self.bytes32(0xF)), b.lshr(q, self.bytes32(4))
        if qh_at is None:
            return lo, hi
        qh = self.load(self.at(0, base, qh_at), V8x32)
        fifth = [b.shl(b.and_(b.lshr(qh, self.bytes32(g)) if g else qh, self.bytes32(1)), self.bytes32(4))
                 for g in (2 * k, 2 * k + 1)]
        return b.or_(lo, fifth[0]), b.or_(hi, fifth[1])

    def halves8(self, base, first: int, stride: int):
        """<8 x float> of the float16 at bytes first + i * stride of the block (i < 8), decoded with
        integer operations (any target): normal numbers rebias the exponent, subnormals scale the
        mantissa by 2^-24, Inf and NaN keep their payload."""
        b = self.b
        v = ir.Constant(ir.VectorType(I16, 8), ir.Undefined)
        for i in range(8):
            h = b.load(b.bitcast(self.at(0, base, first + i * stride), I16.as_pointer()), align=1)
            v = b.insert_element(v, h, ir.Constant(I32, i))
        h = b.zext(v, V32x8)
        c = lambda n: ir.Constant(V32x8, [n] * 8)  # noqa: E731
        em = b.and_(h, c(0x7FFF))
        normal = b.add(b.shl(em, c(13)), c((127 - 15) << 23))
        special = b.or_(b.shl(em, c(13)), c(0x7F800000))
        subnormal = b.bitcast(b.fmul(b.sitofp(em, F32x8), ir.Constant(F32x8, [5.9604644775390625e-08] * 8)), V32x8)
        bits = b.select(b.icmp_unsigned("<", em, c(0x400)), subnormal,
                        b.select(b.icmp_unsigned(">=", em, c(0x7C00)), special, normal))
        return b.bitcast(b.or_(bits, b.shl(b.and_(h, c(0x8000)), c(16))), F32x8)

    def q6_k_half(self, base, h: int):
        """The bytes of half h (128 weights): low-nibble bytes (two vectors), high-bit bytes, 8 scales."""
        lo = self.load(self.at(0, base, 64 * h), V8x32)
        hi = self.load(self.at(0, base, 64 * h + 32), V8x32)
        hb = self.load(self.at(0, base, 128 + 32 * h), V8x32)
        scales = self.load(self.at(0, base, 192 + 8 * h), V8x8)
        return lo, hi, hb, scales

    def q6_k_codes(self, half, k: int):
        """Signed codes q - 32 (-32..31) of weights 32k .. 32k + 31 of a half, as <32 x i8>."""
        lo, hi, hb, _ = half
        b = self.b
        nib = lo if k in (0, 2) else hi
        nib = b.and_(nib, self.bytes32(0xF)) if k < 2 else b.lshr(nib, self.bytes32(4))
        two = b.lshr(hb, self.bytes32(2 * k)) if k else hb
        return b.sub(b.or_(nib, b.shl(b.and_(two, self.bytes32(3)), self.bytes32(4))), self.bytes32(32))

    # -- float products ---------------------------------------------------------------------------
    def fdot(self, codes, first: int, count: int, x: int, xo, signed: bool):
        """<8 x float> partial sums of codes[first : first + 8 * count] times x[xo + first ...]."""
        acc = None
        for i in range(count):
            lanes = self.shuffle(codes, codes, list(range(first + 8 * i, first + 8 * i + 8)))
            c = self.b.sitofp(lanes, F32x8) if signed else self.b.uitofp(lanes, F32x8)
            xv = self.load(self.at(x, xo, first + 8 * i), F32x8)
            acc = self.b.fmul(c, xv) if acc is None else self.muladd(c, xv, acc)
        return acc


def _block(x_dtype, name: str | None = None):
    """Make an intrinsic (row, base, x, xo, a, ai, d, dmin) -> float32 for inputs x of `x_dtype` from
    body(g, base, xo, ai, d, dmin) -> the float IR value; the array arguments are g's 0 (row), 2 (x), 4 (a)."""

    def wrap(body):
        def typer(typingctx, row, base, x, xo, a, ai, d, dmin):
            if not (isinstance(row, types.Array) and row.dtype == types.uint8 and row.ndim == 1
                    and isinstance(x, types.Array) and x.ndim == 1 and x.dtype == x_dtype
                    and isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1):
                return None

            def codegen(context, builder, sig, args):
                return body(BlockIR(context, builder, sig, args), args[1], args[3], args[5], args[6], args[7])

            return types.float32(row, types.intp, x, types.intp, a, types.intp, types.float32, types.float32), codegen

        typer.__name__ = typer.__qualname__ = name or body.__name__
        typer.__doc__ = body.__doc__
        return intrinsic(typer)

    return wrap


def _plus(g: BlockIR, offset, n: int):
    return g.b.add(offset, ir.Constant(offset.type, n))


def _k_f32(qs_at: int, qh_at: int | None):
    def body(g, base, xo, ai, d, dmin):
        """Q4_K / Q5_K: d * sum_g sc_g * sum_l q_l * x_l - dmin * sum_g m_g * a[ai + g] (a: the sums of x per 32)."""
        b = g.b
        scales, mins = g.q4_k_scales(base)
        accs = []
        for k in range(4):
            acc = None
            for j, codes in zip((2 * k, 2 * k + 1), g.k_codes(base, k, qs_at, qh_at)):
                part = g.fdot(codes, 0, 4, 2, _plus(g, xo, 32 * j), signed=False)
                sc = g.splat(g.lane(scales, j))
                acc = b.fmul(part, sc) if acc is None else g.muladd(part, sc, acc)
            accs.append(acc)
        m = g.hsum(b.fmul(mins, g.load(g.at(4, ai), F32x8)))
        return b.fsub(b.fmul(d, g.hsum(g.tree(accs))), b.fmul(dmin, m))

    return body


q4_k_f32 = _block(types.float32, "q4_k_f32")(_k_f32(16, None))
q5_k_f32 = _block(types.float32, "q5_k_f32")(_k_f32(48, 16))


@_block(types.float32)
def q8_0_f32(g, base, xo, ai, d, dmin):
    """8 Q8_0 blocks (34 bytes each: f16 d, 32 int8) as one 256-weight block: sum_i d_i * sum_l q_l * x_l
    (a, ai, d and dmin unused)."""
    b = g.b
    ds = g.halves8(base, 0, 34)
    accs = [None, None]
    for i in range(8):
        codes = g.load(g.at(0, base, 34 * i + 2), V8x32)
        part = g.fdot(codes, 0, 4, 2, _plus(g, xo, 32 * i), signed=True)
        di = g.splat(g.lane(ds, i))
        accs[i % 2] = b.fmul(part, di) if accs[i % 2] is None else g.muladd(part, di, accs[i % 2])
    return g.hsum(g.tree(accs))


@_block(types.float32)
def q6_k_f32(g, base, xo, ai, d, dmin):
    """d * sum over the 16 sub-blocks of sc_s * sum_l (q_l - 32) * x_l (a, ai and dmin unused)."""
    b = g.b
    accs = [None] * 4
    for h in range(2):
        half = g.q6_k_half(base, h)
        scales = b.sitofp(half[3], F32x8)
        for k in range(4):
            codes = g.q6_k_codes(half, k)
            xo_k = _plus(g, xo, 128 * h + 32 * k)
            for j in range(2):  # 16 weights per scale
                part = g.fdot(codes, 16 * j, 2, 2, xo_k, signed=True)
                sc = g.splat(g.lane(scales, 2 * k + j))
                accs[k] = b.fmul(part, sc) if accs[k] is None else g.muladd(part, sc, accs[k])
    return b.fmul(d, g.hsum(g.tree(accs)))


# -- 8-bit inputs (AVX2) ------------------------------------------------------------------------------
_ONES16 = ir.Constant(V16x16, [1] * 16)


def _idot(g: BlockIR, u, s, scales16):
    """<8 x float> partial sums of u (32 unsigned bytes, < 128) times s (32 signed bytes), adjacent pairs
    weighted by scales16 (<16 x i16>): vpmaddubsw, then vpmaddwd, converted to float."""
    madd = g.fn("llvm.x86.avx2.pmadd.ub.sw", V16x16, [V8x32, V8x32])
    wd = g.fn("llvm.x86.avx2.pmadd.wd", V32x8, [V16x16, V16x16])
    return g.b.sitofp(g.b.call(wd, [g.b.call(madd, [u, s]), scales16]), F32x8)


def _signed_idot(g: BlockIR, q, xv, scales16):
    """_idot of signed codes q: vpmaddubsw wants an unsigned operand, so |q| times sign(xq, q)."""
    absf = g.fn("llvm.abs.v32i8", V8x32, [V8x32, I1])
    sign = g.fn("llvm.x86.avx2.psign.b", V8x32, [V8x32, V8x32])
    return _idot(g, g.b.call(absf, [q, ir.Constant(I1, 0)]), g.b.call(sign, [xv, q]), scales16)


def _k_q8(qs_at: int, qh_at: int | None):
    def body(g, base, xo, ai, d, dmin):
        """Q4_K / Q5_K with 8-bit inputs: d * sum_g sc_g * xd_g * isum_g - dmin * sum_g m_g * xsum_g;
        xd = a[ai:ai + 8], xsum = a[ai + 8:ai + 16]."""
        b = g.b
        scales, mins = g.q4_k_scales(base)
        coef = b.fmul(scales, g.load(g.at(4, ai), F32x8))
        acc = ir.Constant(F32x8, [0.0] * 8)
        for k in range(4):
            for j, codes in zip((2 * k, 2 * k + 1), g.k_codes(base, k, qs_at, qh_at)):
                xv = g.load(g.at(2, xo, 32 * j), V8x32)
                acc = g.muladd(_idot(g, codes, xv, _ONES16), g.splat(g.lane(coef, j)), acc)
        m = g.hsum(b.fmul(mins, g.load(g.at(4, ai, 8), F32x8)))
        return b.fsub(b.fmul(d, g.hsum(acc)), b.fmul(dmin, m))

    return body


q4_k_q8 = _block(types.int8, "q4_k_q8")(_k_q8(16, None))
q5_k_q8 = _block(types.int8, "q5_k_q8")(_k_q8(48, 16))


@_block(types.int8)
def q8_0_q8(g, base, xo, ai, d, dmin):
    """8 Q8_0 blocks with 8-bit inputs: sum_i d_i * xd_i * sum_l q_l * xq_l, xd = a[ai:ai + 8]."""
    coef = g.b.fmul(g.halves8(base, 0, 34), g.load(g.at(4, ai), F32x8))
    acc = ir.Constant(F32x8, [0.0] * 8)
    for i in range(8):
        q = g.load(g.at(0, base, 34 * i + 2), V8x32)
        xv = g.load(g.at(2, xo, 32 * i), V8x32)
        acc = g.muladd(_signed_idot(g, q, xv, _ONES16), g.splat(g.lane(coef, i)), acc)
    return g.hsum(acc)


@_block(types.int8)
def q6_k_q8(g, base, xo, ai, d, dmin):
    """d * sum_g xd_g * sum_l sc(l) * (q_l - 32) * xq_l, xd = a[ai:ai + 8]."""
    b = g.b
    xd = g.load(g.at(4, ai), F32x8)
    acc = ir.Constant(F32x8, [0.0] * 8)
    for h in range(2):
        half = g.q6_k_half(base, h)
        sc16 = b.sext(half[3], V16x8)
        for k in range(4):
            q = g.q6_k_codes(half, k)
            xv = g.load(g.at(2, xo, 128 * h + 32 * k), V8x32)
            scales = g.shuffle(sc16, sc16, [2 * k] * 8 + [2 * k + 1] * 8)  # one per 16 weights
            acc = g.muladd(_signed_idot(g, q, xv, scales), g.splat(g.lane(xd, 4 * h + k)), acc)
    return b.fmul(d, g.hsum(acc))
