"""CPU operations of the forward pass other than the quantized matmuls (those are engine/kernels).

Legend: n = positions in this call, T = positions in the cache, H = hidden, h = heads,
kvh = KV heads, hd = head_dim, E = experts, k = experts used per token.
All activations are float32; reductions that HF does in float32 are done in float32 here too.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _rmsnorm_rows(x, weight, eps, out):
    # x, out: (m, d) f32. The mean of squares is accumulated in float64 and rounded once to float32.
    d = x.shape[1]
    for i in range(x.shape[0]):
        ss = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            ss += v * v
        r = np.float32(1.0) / np.sqrt(np.float32(ss / d) + eps)
        for j in range(d):
            out[i, j] = weight[j] * (x[i, j] * r)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., d) f32 -> weight * (x * 1 / sqrt(mean(x^2) + eps)), as HF's Qwen3MoeRMSNorm (float32)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    _rmsnorm_rows(flat, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (n, hd/2) f32 for NeoX-style RoPE; inv_freq = theta^(-2i/hd) as HF computes it."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (n, hd/2)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (n, heads, hd). Rotates the two halves of each head: [a, b] -> [a cos - b sin, b cos + a sin]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate((a * c - b * s, b * c + a * s), axis=-1)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(a, b):
    """a . b over one head (hd,): reassociated so LLVM vectorises it, in an order fixed at compile time."""
    acc = np.float32(0.0)
    for d in range(a.shape[0]):
        acc += a[d] * b[d]
    return acc


@njit(cache=True, parallel=True, fastmath=False)
def _attention(q, kc, vc, p0, scale, out):
    # q: (n, h, hd); kc, vc: (T, kvh, hd); out: (n, h, hd). Position p0 + t sees 0 .. p0 + t.
    # Every (position, head) is computed alone, the same way whatever the batch: a decode step gives the
    # bits a full recompute gives. The weighted sum of V runs over positions in order, every feature at
    # once (contiguous rows of the cache).
    n, nh, hd = q.shape
    group = nh // kc.shape[1]
    for idx in prange(n * nh):
        t = idx // nh
        head = idx % nh
        kvh = head // group
        last = p0 + t
        scores = np.empty(last + 1, dtype=np.float32)
        m = -np.inf
        for s in range(last + 1):
            sc = _dot(q[t, head], kc[s, kvh]) * scale
            scores[s] = sc
            if sc > m:
                m = sc
        denom = np.float32(0.0)
        for s in range(last + 1):
            e = np.float32(math.exp(scores[s] - m))
            scores[s] = e
            denom += e
        acc = np.zeros(hd, dtype=np.float32)
        for s in range(last + 1):
            for d in range(hd):
                acc[d] += scores[s] * vc[s, kvh, d]
        for d in range(hd):
            out[t, head, d] = acc[d] / denom


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, p0: int) -> np.ndarray:
    """Causal GQA attention. q: (n, h, hd); k_cache, v_cache: (T, kvh, hd) with T = p0 + n."""
    out = np.empty_like(q)
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    _attention(q, k_cache, v_cache, p0, scale, out)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (..., E)."""
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m, dtype=np.float32)
    return (e / np.sum(e, axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32, copy=False)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, E) -> indices (n, k) int32 by descending prob (ties: lower expert id first), and their probs."""
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int32)
    return idx, np.take_along_axis(probs, idx, axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (np.float32(1.0) + np.exp(-x, dtype=np.float32))).astype(np.float32, copy=False)
