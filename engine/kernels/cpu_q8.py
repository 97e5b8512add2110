"""8-bit activations for single-token products (the `cpu-q8` backend): an explicit fast mode.

The default CPU path multiplies float32 activations, matching the Hugging Face reference to float32
rounding. This mode does what llama.cpp does on a CPU: each input row x is quantized to 8 bits per
element, in blocks of 32 with one scale, and the K-quant weights are dotted with it in integer
arithmetic (AVX2: `vpmaddubsw` multiplies 32 unsigned weight codes by 32 signed inputs and adds pairs,
`vpmaddwd` applies the 16-bit sub-block scales). The float work is one multiply-add per 32 elements.

The input is quantized exactly as gguf-py quantizes a Q8_0 tensor (`gguf.quants.Q8_0.quantize_blocks`,
after ggml's `quantize_row_q8_0_ref`): d = max|x| / 127, q = round-half-away(x / d), the scale kept as
float16. llama.cpp uses 256-element blocks (Q8_K) for K-quants; 32-element blocks follow the weights'
sub-blocks and are finer. So a product here equals, to float32 rounding,
    dequantize(W) @ dequantize(quantize_q8_0(x))
with both dequantizes gguf-py's: tests/engine/test_cpu_q8.py checks exactly that, and the model's
logits against llama.cpp (tests/reference/test_llama_cpp.py) and against the float32 path.

What it covers: one token (decode steps; a single-token prompt) through Q4_K and Q6_K weights, the types
of a Q4_K_M file's matmuls. Other types and prefill batches take the float32 kernels. A non-finite input
block keeps its NaN/Inf as its scale, so a NaN still reaches the forward's check.

Needs AVX2 and F16C (x86-64 since 2013); `unavailable()` says why not otherwise. The block dots are LLVM
IR written here (Numba intrinsics), straight-line per 256-element block; the loops over rows, experts
and blocks are ordinary Numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants import QK_K, QT
from .cpu import FASTMATH, _add_in_order, _single_token

Q8_BLOCK = 32  # input elements per scale

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_V8x32 = ir.VectorType(_I8, 32)
_V8x8 = ir.VectorType(_I8, 8)
_V16x16 = ir.VectorType(_I16, 16)
_V16x8 = ir.VectorType(_I16, 8)
_V32x8 = ir.VectorType(_I32, 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)


def unavailable() -> str | None:
    """None when this CPU runs the 8-bit kernels; else why not, in one line."""
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception as exc:  # noqa: BLE001 - an unknown host is a host without the features
        return f"8-bit activations need AVX2 and F16C; this CPU's features are unknown ({exc})"
    missing = [f for f in ("avx2", "f16c") if not features.get(f, False)]
    if missing:
        return f"8-bit activations need AVX2 and F16C; this CPU lacks {' and '.join(missing)}"
    return None


# ---------------------------------------------------------------------------------------------
# LLVM IR helpers (used inside the intrinsics' codegen)
class _IR:
    def __init__(self, context, builder, sig, args):
        self.context, self.b = context, builder
        self.arrays = {i: (t, a) for i, (t, a) in enumerate(zip(sig.args, args)) if isinstance(t, types.Array)}
        self.args = args

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

    def half(self, ptr):
        """The little-endian float16 at a byte pointer, as float."""
        return self.b.fpext(self.b.load(self.b.bitcast(ptr, ir.HalfType().as_pointer()), align=1), ir.FloatType())

    def splat8(self, v: int):
        return ir.Constant(_V8x32, [v] * 32)

    def shuffle(self, a, b, idx):
        return self.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), idx))

    def splatf(self, v):
        one = self.b.insert_element(ir.Constant(_F32x8, ir.Undefined), v, ir.Constant(_I32, 0))
        return self.shuffle(one, one, [0] * 8)

    def lane(self, v, i: int):
        return self.b.extract_element(v, ir.Constant(_I32, i))

    def dot32(self, u, s, scales16):
        """<8 x float> partial sums of u (32 unsigned bytes, < 128) times s (32 signed bytes), pairs
        weighted by scales16 (<16 x i16>): vpmaddubsw then vpmaddwd, converted to float."""
        madd = self.fn("llvm.x86.avx2.pmadd.ub.sw", _V16x16, [_V8x32, _V8x32])
        wd = self.fn("llvm.x86.avx2.pmadd.wd", _V32x8, [_V16x16, _V16x16])
        return self.b.sitofp(self.b.call(wd, [self.b.call(madd, [u, s]), scales16]), _F32x8)

    def hsum(self, v):
        """Sum of the 8 lanes, in a fixed order: halves, then pairs, then the last two."""
        s = self.b.fadd(self.shuffle(v, v, [0, 1, 2, 3]), self.shuffle(v, v, [4, 5, 6, 7]))
        s = self.b.fadd(self.shuffle(s, s, [0, 1]), self.shuffle(s, s, [2, 3]))
        return self.b.fadd(self.lane(s, 0), self.lane(s, 1))


_ONES16 = ir.Constant(_V16x16, [1] * 16)


# Both block intrinsics: (row, base, xq, xo, xd, xsum, xs) -> float32, the dot of the 256-element block
# at byte `base` of a weight row with xq[xo:xo + 256] (int8 codes), whose 8 scales are xd[xs:xs + 8]
# and the sums of whose dequantized groups of 32 are xsum[xs:xs + 8].
def _block_signature(row, xq, xd, xsum):
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and row.ndim == 1
            and isinstance(xq, types.Array) and xq.dtype == types.int8 and xq.ndim == 1
            and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1 for a in (xd, xsum))):
        return None
    return types.float32(row, types.intp, xq, types.intp, xd, xsum, types.intp)


@intrinsic
def _q4_k_block(typingctx, row, base, xq, xo, xd, xsum, xs):
    """Q4_K (144 bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles):
    d * sum_g sc_g * xd_g * isum_g - dmin * sum_g m_g * xsum_g over the 8 groups of 32."""
    sig = _block_signature(row, xq, xd, xsum)

    def codegen(context, builder, signature, args):
        g = _IR(context, builder, signature, args)
        b, base_, xo_, xs_ = builder, args[1], args[3], args[6]
        d = g.half(g.at(0, base_))
        dmin = g.half(g.at(0, base_, 2))
        lo8 = g.load(g.at(0, base_, 4), _V8x8)  # bytes 0..7 of the scales
        hi8 = g.load(g.at(0, base_, 8), _V8x8)  # bytes 4..11
        mask = ir.Constant(_V8x8, [63] * 4 + [15] * 4)
        top = ir.Constant(_V8x8, [0] * 4 + [0x30] * 4)
        six = ir.Constant(_V8x8, [6] * 8)
        four = ir.Constant(_V8x8, [4] * 8)
        # sub-block j < 4: byte j & 63 (scale), byte j + 4 & 63 (min); j >= 4: the low / high nibble of
        # byte j + 4 and the top two bits of byte j - 4 (scale) / byte j (min) above them
        sc = b.or_(b.and_(g.shuffle(lo8, hi8, [0, 1, 2, 3, 12, 13, 14, 15]), mask),
                   b.and_(b.shl(b.lshr(g.shuffle(lo8, lo8, [0, 1, 2, 3, 0, 1, 2, 3]), six), four), top))
        mn = b.or_(b.and_(b.lshr(g.shuffle(lo8, hi8, [4, 5, 6, 7, 12, 13, 14, 15]),
                                 ir.Constant(_V8x8, [0] * 4 + [4] * 4)), mask),
                   b.and_(b.shl(b.lshr(g.shuffle(lo8, lo8, [4, 5, 6, 7, 4, 5, 6, 7]), six), four), top))
        xd8 = g.load(g.at(4, xs_), _F32x8)
        coef = b.fmul(b.uitofp(sc, _F32x8), xd8)
        acc = ir.Constant(_F32x8, [0.0] * 8)
        for k in range(4):  # 32 bytes of nibbles: low = group 2k, high = group 2k + 1
            q = g.load(g.at(0, base_, 16 + 32 * k), _V8x32)
            for j, codes in ((2 * k, b.and_(q, g.splat8(0xF))), (2 * k + 1, b.lshr(q, g.splat8(4)))):
                x = g.load(g.at(2, xo_, 32 * j), _V8x32)
                acc = b.fadd(acc, b.fmul(g.dot32(codes, x, _ONES16), g.splatf(g.lane(coef, j))))
        mins = g.hsum(b.fmul(b.uitofp(mn, _F32x8), g.load(g.at(5, xs_), _F32x8)))
        return b.fsub(b.fmul(d, g.hsum(acc)), b.fmul(dmin, mins))

    return sig, codegen


@intrinsic
def _q6_k_block(typingctx, row, base, xq, xo, xd, xsum, xs):
    """Q6_K (210 bytes: 128 of low nibbles, 64 of high bit pairs, 16 int8 scales, d):
    d * sum_g xd_g * sum_l sc(l) * (q_l - 32) * xq_l; the signed codes go through |q| and sign(x, q)."""
    sig = _block_signature(row, xq, xd, xsum)

    def codegen(context, builder, signature, args):
        g = _IR(context, builder, signature, args)
        b, base_, xo_, xs_ = builder, args[1], args[3], args[6]
        absf = g.fn("llvm.abs.v32i8", _V8x32, [_V8x32, _I1])
        sign = g.fn("llvm.x86.avx2.psign.b", _V8x32, [_V8x32, _V8x32])
        xd8 = g.load(g.at(4, xs_), _F32x8)
        acc = ir.Constant(_F32x8, [0.0] * 8)
        for h in range(2):  # two halves of 128 elements
            lo = g.load(g.at(0, base_, 64 * h), _V8x32)
            hi = g.load(g.at(0, base_, 64 * h + 32), _V8x32)
            hb = g.load(g.at(0, base_, 128 + 32 * h), _V8x32)
            sc16 = b.sext(g.load(g.at(0, base_, 192 + 8 * h), _V8x8), _V16x8)
            for k in range(4):  # elements 32k .. 32k + 31 of the half
                nib = lo if k in (0, 2) else hi
                nib = b.and_(nib, g.splat8(0xF)) if k < 2 else b.lshr(nib, g.splat8(4))
                two = b.lshr(hb, g.splat8(2 * k)) if k else hb
                q = b.sub(b.or_(nib, b.shl(b.and_(two, g.splat8(3)), g.splat8(4))), g.splat8(32))
                x = g.load(g.at(2, xo_, 128 * h + 32 * k), _V8x32)
                scales = g.shuffle(sc16, sc16, [2 * k] * 8 + [2 * k + 1] * 8)  # one per 16 elements
                part = g.dot32(b.call(absf, [q, ir.Constant(_I1, 0)]), b.call(sign, [x, q]), scales)
                acc = b.fadd(acc, b.fmul(part, g.splatf(g.lane(xd8, 4 * h + k))))
        return b.fmul(g.half(g.at(0, base_, 208)), g.hsum(acc))

    return sig, codegen


@intrinsic
def _to_f16_and_back(typingctx, value):
    """value rounded to the nearest float16 (ties to even), as float32: how gguf-py stores a Q8_0 scale."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(value), codegen


# ---------------------------------------------------------------------------------------------
# the input: quantized once per call, for every row of x
@njit(cache=True)
def _quantize_rows(x, xq, xd, xsum):
    """x (m, C) f32 -> xq (m, C) int8, xd (m, C/32) scales, xsum (m, C/32) = xd * sum of the codes.
    gguf-py's Q8_0 arithmetic, in float32: d = amax / 127, id = 1 / d (0 when d is 0), q = round half away
    from zero of x * id; the stored scale is d rounded to float16. A non-finite block: scale NaN (or Inf
    when it has no NaN) and codes 0, so the products come out NaN."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1] // Q8_BLOCK):
            o = j * Q8_BLOCK
            amax = np.float32(0.0)
            nan = False
            inf = False
            for i in range(Q8_BLOCK):
                v = x[r, o + i]
                if np.isnan(v):
                    nan = True
                elif np.isinf(v):
                    inf = True
                else:
                    amax = max(amax, abs(v))
            if nan or inf:
                xd[r, j] = np.float32(np.nan) if nan else np.float32(np.inf)
                xsum[r, j] = xd[r, j]
                for i in range(Q8_BLOCK):
                    xq[r, o + i] = 0
                continue
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            total = 0
            for i in range(Q8_BLOCK):
                v = x[r, o + i] * inv
                a = abs(v)
                fl = np.floor(a)
                q = np.int32(min(fl + np.floor(np.float32(2.0) * (a - fl)), np.float32(127.0)))  # (> 127: d underflowed)
                q = -q if v < 0 else q
                xq[r, o + i] = q
                total += q
            xd[r, j] = _to_f16_and_back(d)
            xsum[r, j] = xd[r, j] * np.float32(total)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xq, xd, xsum) of a C-contiguous float32 (m, C), C a multiple of 32 (see _quantize_rows)."""
    m, cols = x.shape
    xq = np.empty((m, cols), np.int8)
    xd = np.empty((m, cols // Q8_BLOCK), np.float32)
    xsum = np.empty_like(xd)
    _quantize_rows(x, xq, xd, xsum)
    return xq, xd, xsum


# ---------------------------------------------------------------------------------------------
# the products: one token, its k experts (k = 1 for a plain matvec); rows as in cpu._single_token
def _row_dot(block, row_bytes):
    @njit(inline="always")
    def dot(row, xq, xr, aux):
        xd, xsum = aux
        xqr, xdr, xsr = xq[xr], xd[xr], xsum[xr]
        acc = np.float32(0.0)
        for b in range(xq.shape[1] // QK_K):
            acc = _add_in_order(acc, block(row, b * row_bytes, xqr, b * QK_K, xdr, xsr, b * (QK_K // Q8_BLOCK)))
        return acc

    return dot


_row_q4_k = _row_dot(_q4_k_block, 144)
_row_q6_k = _row_dot(_q6_k_block, 210)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q4_k(w, sel, xq, xd, xsum, out):
    _single_token(_row_q4_k, w, sel, xq, (xd, xsum), out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q6_k(w, sel, xq, xd, xsum, out):
    _single_token(_row_q6_k, w, sel, xq, (xd, xsum), out)


VEC = {QT.Q4_K: _vec_q4_k, QT.Q6_K: _vec_q6_k}


def single_token(qtype: int, w: np.ndarray, sel: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """cpu._grouped's one-token case with 8-bit inputs: w uint8 (E, R, RB) read-only, sel int32 (1, k)
    checked, x float32 (1 or k, C) read-only, out float32 (k, R)."""
    xq, xd, xsum = quantize_rows(x)
    VEC[qtype](w, sel, xq, xd, xsum, out)
