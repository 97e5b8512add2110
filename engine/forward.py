"""The qwen3_moe forward pass: the only one there is.

Follows shared/docs/qwen3moe.md and Hugging Face's `modeling_qwen3_moe.py`. Tracing is the
`recorder` argument (engine/recorder.py); generation, `trace export` and the app all call this.

Legend: n = new positions in this call, H = hidden, h = query heads, kvh = KV heads,
hd = head_dim, E = experts, k = experts used per token, F = expert (moe) intermediate size, V = vocab.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .config import Knobs
from .kernels import activation_stats, expert_matmul, get_rows, matmul
from .kv_cache import KVCache
from .model import Model, QTensor
from .recorder import NULL_RECORDER, Recorder

DEFAULT_KNOBS = Knobs()


def linear(w: QTensor, x: np.ndarray) -> np.ndarray:
    """x: (n, in) f32 -> (n, out) f32 = x @ W^T, reading W's quantized rows in place."""
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    matmul(w.qtype, w.raw, np.ascontiguousarray(x), out)
    return out


def experts(w: QTensor, selected: np.ndarray, x: np.ndarray) -> np.ndarray:
    """selected: (n, k) int32; x: (n, 1 or k, in) -> (n, k, out): each token through its k experts."""
    out = np.empty((x.shape[0], selected.shape[1], w.shape[1]), dtype=np.float32)
    expert_matmul(w.qtype, w.raw, selected, np.ascontiguousarray(x), out)
    return out


def final_norm(model: Model, x: np.ndarray) -> np.ndarray:
    """The final RMSNorm of the residual stream (m, H) -> (m, H)."""
    return ops.rmsnorm(x, model.output_norm, model.config.rms_eps)


def lm_head(model: Model, normed: np.ndarray) -> np.ndarray:
    """(m, H) -> logits (m, V) with output.weight, or token_embd.weight when the file ties them.

    The forward ends with final_norm then lm_head; the logit lens applies both to earlier layers.
    """
    return linear(model.output, normed)


def forward(
    model: Model,
    tokens: np.ndarray,
    cache: KVCache,
    *,
    knobs: Knobs = DEFAULT_KNOBS,
    recorder: Recorder = NULL_RECORDER,
    all_logits: bool = False,
) -> np.ndarray:
    """Run `tokens` (n,) at positions cache.length .. cache.length + n - 1 and append them to the cache.

    Returns float32 logits (n, V) when `all_logits` (or the recorder asks for them), else (1, V) for
    the last position. Token ids must already be validated (engine.session does it).
    """
    cfg = model.config
    rec = recorder
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    cache.reserve(n)
    p0 = cache.length
    positions = np.arange(p0, p0 + n, dtype=np.int64)
    h_, kvh, hd, k_used = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts_used
    eps = cfg.rms_eps
    theta = knobs.rope_theta if knobs.rope_theta is not None else cfg.rope_theta
    cos, sin = ops.rope_tables(positions, hd, theta)

    def record(layer, slot, x):
        rec.slot(layer, slot, positions, activation_stats(x), x if rec.capture_vectors else None)

    # token embeddings
    x = np.empty((n, cfg.hidden), dtype=np.float32)  # (n, H) the residual stream
    get_rows(model.token_embd.qtype, model.token_embd.raw, tokens, x)
    if rec.enabled:
        record(None, "embedding", x)

    for i, L in enumerate(model.layers):
        # attention rmsnorm
        h = ops.rmsnorm(x, L.attn_norm, eps)  # (n, H)
        # qkv matmuls for these positions
        q = linear(L.attn_q, h)  # (n, h*hd)
        k = linear(L.attn_k, h)  # (n, kvh*hd)
        v = linear(L.attn_v, h)  # (n, kvh*hd)
        if rec.enabled:
            record(i, "attn_norm", h)
            record(i, "qkv", np.concatenate((q, k, v), axis=1))
        q = q.reshape(n, h_, hd)
        k = k.reshape(n, kvh, hd)
        # per-head RMSNorm of q and k over head_dim, before RoPE (unlike llama: Qwen3 has it)
        if knobs.qk_norm:
            q = ops.rmsnorm(q, L.attn_q_norm, eps)
            k = ops.rmsnorm(k, L.attn_k_norm, eps)
        # rotary position embedding, NeoX style (two halves of each head)
        q = ops.rope_neox(q, cos, sin)
        k = ops.rope_neox(k, cos, sin)
        # save key, value at these positions to the kv cache
        cache.k[i, p0 : p0 + n] = k
        cache.v[i, p0 : p0 + n] = v.reshape(n, kvh, hd)
        # causal GQA attention over every position so far
        attn = ops.attention(q, cache.k[i, : p0 + n], cache.v[i, : p0 + n], p0)  # (n, h, hd)
        o = linear(L.attn_output, attn.reshape(n, h_ * hd))  # (n, H)
        if rec.enabled:
            record(i, "attn_out", o)
        # residual connection back into x
        x = x + o

        # ffn rmsnorm
        h = ops.rmsnorm(x, L.ffn_norm, eps)  # (n, H)
        # router: softmax over all experts, top-k, renormalise the k weights (norm_topk_prob)
        router_logits = linear(L.ffn_gate_inp, h)  # (n, E)
        routing_weights = ops.softmax(router_logits)  # (n, E)
        selected_experts, expert_weights = ops.top_k(routing_weights, k_used)  # (n, k), (n, k)
        if knobs.norm_topk_prob:
            expert_weights = expert_weights / np.sum(expert_weights, axis=-1, keepdims=True, dtype=np.float32)
        # experts: y = sum_k w_k * down_k(silu(gate_k h) * up_k h); only the selected experts' rows are read
        gate = experts(L.ffn_gate_exps, selected_experts, h[:, None, :])  # (n, k, F)
        up = experts(L.ffn_up_exps, selected_experts, h[:, None, :])  # (n, k, F)
        down = experts(L.ffn_down_exps, selected_experts, ops.silu(gate) * up)  # (n, k, H)
        y = np.einsum("nk,nkh->nh", expert_weights, down).astype(np.float32, copy=False)  # (n, H)
        if rec.enabled:
            record(i, "ffn_norm", h)
            rec.router(i, positions, router_logits, routing_weights, selected_experts, expert_weights)
            record(i, "ffn_out", y)
        # residual connection back into x
        x = x + y
        if rec.enabled:
            record(i, "output", x)

    # final rmsnorm and the lm_head
    x = final_norm(model, x)  # (n, H)
    if rec.enabled:
        record(None, "final_norm", x)
    rows = x if (all_logits or rec.all_logits) else x[-1:]
    logits = lm_head(model, rows)  # (n or 1, V)
    if rec.enabled:
        rec.logits(positions[-rows.shape[0]:], logits)
    cache.length = p0 + n
    return logits
