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

What it covers: one token (decode steps; a single-token prompt) through Q4_K, Q5_K, Q6_K and Q8_0
weights (Q8_0 when a row is whole 256-weight blocks, as the model's are): the types of the Q4_K_M, Q5_K_M
and Q8_0 files. Float weights and prefill batches take the float32 kernels. A non-finite input
block keeps its NaN/Inf as its scale, so a NaN still reaches the forward's check.

Needs AVX2 and F16C (x86-64 since 2013); `unavailable()` says why not otherwise. The block dots are the
`_q8` intrinsics of engine/kernels/blocks.py, straight-line LLVM IR per 256-element block; the loops
over rows, experts and blocks are cpu.py's.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..quants import QK_K, QT
from . import blocks
from .cpu import FASTMATH, _row_dot, _single_token

Q8_BLOCK = 32  # input elements per scale
PER_BLOCK = QK_K // Q8_BLOCK  # scales per 256-element block


@functools.cache
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
def _quantize_rows(x, xq, xa):
    """x (m, C) f32 -> xq (m, C) int8 codes and xa (m, C/16): per 256 inputs, the 8 scales of their
    blocks of 32, then the 8 sums of those blocks dequantized (scale * sum of codes; Q4_K's mins).
    gguf-py's Q8_0 arithmetic, in float32: d = amax / 127, id = 1 / d (0 when d is 0), q = round half away
    from zero of x * id; the stored scale is d rounded to float16. A non-finite block: scale NaN (or Inf
    when it has no NaN) and codes 0, so the products come out NaN."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1] // Q8_BLOCK):
            o = j * Q8_BLOCK
            at = j // PER_BLOCK * 2 * PER_BLOCK + j % PER_BLOCK  # the scale's slot; its sum's is at + 8
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
                xa[r, at] = np.float32(np.nan) if nan else np.float32(np.inf)
                xa[r, at + PER_BLOCK] = xa[r, at]
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
            xa[r, at] = _to_f16_and_back(d)
            xa[r, at + PER_BLOCK] = xa[r, at] * np.float32(total)


@njit(cache=True)
def quantize_rows(x):
    """(xq, xa) of a C-contiguous float32 (m, C), C a multiple of 256 (see _quantize_rows)."""
    xq = np.empty(x.shape, np.int8)
    xa = np.empty((x.shape[0], x.shape[1] // QK_K * 2 * PER_BLOCK), np.float32)
    _quantize_rows(x, xq, xa)
    return xq, xa


def scales_and_sums(xa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xa's scales (m, C/32) and sums (m, C/32), each in input order."""
    per = xa.reshape(xa.shape[0], -1, 2, PER_BLOCK)
    return per[:, :, 0].reshape(xa.shape[0], -1), per[:, :, 1].reshape(xa.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# the products: one token, its k experts (k = 1 for a plain matvec); rows as in cpu._single_token
_row_q4_k = _row_dot(blocks.q4_k_q8, QT.Q4_K, 2 * PER_BLOCK)
_row_q5_k = _row_dot(blocks.q5_k_q8, QT.Q5_K, 2 * PER_BLOCK)
_row_q6_k = _row_dot(blocks.q6_k_q8, QT.Q6_K, 2 * PER_BLOCK)
_row_q8_0 = _row_dot(blocks.q8_0_q8, QT.Q8_0, 2 * PER_BLOCK)


# w (E, R, RB) uint8; sel int32 (1, k); x f32 (1 or k, C), C a multiple of 256; out f32 (k, R). The input
# is quantized first, serially (a few thousand values), then the rows are dotted in parallel.
@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q4_k(w, sel, x, out):
    xq, xa = quantize_rows(x)
    _single_token(_row_q4_k, w, sel, xq, xa, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q5_k(w, sel, x, out):
    xq, xa = quantize_rows(x)
    _single_token(_row_q5_k, w, sel, xq, xa, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q6_k(w, sel, x, out):
    xq, xa = quantize_rows(x)
    _single_token(_row_q6_k, w, sel, xq, xa, out)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _vec_q8_0(w, sel, x, out):
    xq, xa = quantize_rows(x)
    _single_token(_row_q8_0, w, sel, xq, xa, out)


VEC = {QT.Q4_K: _vec_q4_k, QT.Q5_K: _vec_q5_k, QT.Q6_K: _vec_q6_k, QT.Q8_0: _vec_q8_0}


def kernel(qtype: int):
    """The one-token kernel of qtype; RuntimeError (one line) on a CPU that cannot run it, before LLVM
    would be asked to compile AVX2 instructions for it."""
    if (why := unavailable()) is not None:
        raise RuntimeError(why)
    return VEC[qtype]
