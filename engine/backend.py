"""Backends: where the one forward pass (engine/forward.py) does its array work.

The forward is written once. Every array operation in it goes through `model.backend`, an object
with the methods of `CpuBackend` below: the CPU backend is numpy + the Numba kernels of
engine/kernels/cpu.py (exactly the code the forward ran before backends existed), the CUDA backend
(engine/cuda_backend.py) runs numba-cuda kernels on weights copied once to the GPU as raw GGUF blocks.
Arrays a backend hands back are its own (numpy arrays, or device arrays); the forward only reshapes
them, and `to_host` brings back what the recorder and the sampler read.

Pick a backend where the model is loaded: `load_model(path, backend="cuda")`. `cpu-q8` is the CPU
backend with one difference: single-token products through K-quant and Q8_0 weights quantize their input to
8 bits (engine/kernels/cpu_q8.py), an explicit fast mode that rounds like llama.cpp rather than like the
float32 reference.
Shapes: n = positions, H = hidden, h = heads, hd = head_dim, E = experts, k = experts used per token,
F = expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import ops
from .config import BACKENDS
from .errors import WorkbenchError
from .kernels import activation_stats, expert_matmul, get_rows, matmul


class BackendUnavailable(WorkbenchError):
    """The chosen backend cannot run here (numba-cuda missing, no GPU); the message names what is missing."""


class CpuBackend:
    """numpy and the Numba CPU kernels. Stateless: one instance serves every model."""

    name = "cpu"
    launches = 0  # kernel launches so far; the CPU backend does not count them
    q8 = False  # 8-bit inputs for single-token products (CpuQ8Backend)

    # -- host transfer and the KV cache's storage ----------------------------------------------
    def to_host(self, a) -> np.ndarray:
        return a

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    def cache_array(self, shape: tuple) -> np.ndarray:
        """Storage for the KV cache: float32 `shape`; positions are written before they are read."""
        return np.zeros(shape, dtype=np.float32)

    def copy_positions(self, dst: np.ndarray, src: np.ndarray, length: int) -> None:
        """dst[:, :length] = src[:, :length] for cache arrays (L, T, kvh, hd)."""
        dst[:, :length] = src[:, :length]

    # -- the forward's steps --------------------------------------------------------------------
    def embed(self, w, tokens: np.ndarray) -> np.ndarray:
        """tokens (n,) int64 -> (n, H): rows of the token embedding, dequantized."""
        x = np.empty((tokens.shape[0], w.shape[1]), dtype=np.float32)
        get_rows(w.qtype, w.raw, tokens, x)
        return x

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis: (n, H) with a (H,) weight, or per head (n, heads, hd) with (hd,)."""
        return ops.rmsnorm(x, weight, eps)

    def linear(self, w, x: np.ndarray) -> np.ndarray:
        """x: (n, in) f32 -> (n, out) f32 = x @ W^T, reading W's quantized rows in place."""
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        matmul(w.qtype, w.raw, np.ascontiguousarray(x), out, q8=self.q8)
        return out

    def rope_tables(self, positions: np.ndarray, head_dim: int, theta: float):
        """cos, sin (n, hd/2) for these positions."""
        return ops.rope_tables(positions, head_dim, theta)

    def rope(self, x: np.ndarray, tables) -> np.ndarray:
        """x: (n, heads, hd) rotated NeoX style (the two halves of each head)."""
        cos, sin = tables
        return ops.rope_neox(x, cos, sin)

    def attend(self, cache, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int) -> np.ndarray:
        """Write k, v (n, kvh, hd) at positions p0.. of the layer's cache, then causal GQA attention of
        q (n, h, hd) over positions 0 .. p0 + t; returns (n, h, hd)."""
        n = q.shape[0]
        cache.k[layer, p0 : p0 + n] = k
        cache.v[layer, p0 : p0 + n] = v
        return ops.attention(q, cache.k[layer, : p0 + n], cache.v[layer, : p0 + n], p0)

    def route(self, router_logits: np.ndarray, k: int, norm_topk_prob: bool):
        """router_logits (n, E) -> routing_weights (n, E) softmax over all experts, selected_experts
        (n, k) the top k (descending, ties to the lower id), expert_weights (n, k), renormalised to
        sum 1 when norm_topk_prob."""
        routing_weights = ops.softmax(router_logits)
        selected_experts, expert_weights = ops.top_k(routing_weights, k)
        if norm_topk_prob:
            expert_weights = expert_weights / np.sum(expert_weights, axis=-1, keepdims=True, dtype=np.float32)
        return routing_weights, selected_experts, expert_weights

    def experts(self, w, selected: np.ndarray, x: np.ndarray) -> np.ndarray:
        """selected (n, k); x (n, H) for every expert of a token, or (n, k, F) one per slot ->
        (n, k, out): each token through its k experts, reading only those experts' rows."""
        if x.ndim == 2:
            x = x[:, None, :]
        out = np.empty((x.shape[0], selected.shape[1], w.shape[1]), dtype=np.float32)
        expert_matmul(w.qtype, w.raw, selected, np.ascontiguousarray(x), out, q8=self.q8)
        return out

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, elementwise."""
        return ops.silu(gate) * up

    def weighted_sum(self, weights: np.ndarray, down: np.ndarray) -> np.ndarray:
        """weights (n, k), down (n, k, H) -> (n, H) = sum_k weights[:, k] * down[:, k]."""
        return np.einsum("nk,nkh->nh", weights, down).astype(np.float32, copy=False)

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x + y

    def concat(self, parts) -> np.ndarray:
        """Side by side along the last axis: the qkv slot."""
        return np.concatenate(parts, axis=1)

    def last_rows(self, x: np.ndarray, m: int) -> np.ndarray:
        return x[-m:]

    def stats(self, x: np.ndarray) -> np.ndarray:
        """float64 (n, 10) activation statistics of x (n, d) in kernels.STAT_FIELDS order, on the host."""
        return activation_stats(x)


class CpuQ8Backend(CpuBackend):
    """The CPU backend with 8-bit activations in single-token Q4_K/Q5_K/Q6_K/Q8_0 products (decode steps)."""

    name = "cpu-q8"
    q8 = True


CPU = CpuBackend()
CPU_Q8 = CpuQ8Backend()


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (one line), or None when it can."""
    try:
        check_available(name)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def check_available(name: str) -> None:
    """BackendUnavailable (one line) when backend `name` cannot run on this machine."""
    if name == "cpu-q8":
        from .kernels.cpu_q8 import unavailable

        if (why := unavailable()) is not None:
            raise BackendUnavailable(why)
    elif name == "cuda":
        from .cuda_backend import CudaBackend

        CudaBackend(None)
    elif name != "cpu":
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def create_backend(name: str, model, progress: Callable[[int, int], None] | None = None):
    """The backend `name` (one of BACKENDS) for `model`; the CUDA one copies the weights to the GPU.

    progress(done_bytes, total_bytes) is called as tensors are copied. BackendUnavailable with a one-line
    message when numba-cuda is not installed or no GPU can be used.
    """
    if name == "cpu":
        return CPU
    if name == "cpu-q8":
        check_available(name)
        return CPU_Q8
    if name == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend(model, progress=progress)
    raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")

