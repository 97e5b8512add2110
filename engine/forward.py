"""The qwen3_moe forward pass: the only one there is.

Follows shared/docs/qwen3moe.md and Hugging Face's `modeling_qwen3_moe.py`. Tracing is the
`recorder` argument (engine/recorder.py); generation, `trace export` and the app all call this.
Where the arithmetic runs is the model's backend (engine/backend.py: numpy + Numba on the CPU, or
numba-cuda on a GPU): this function says what is computed, the backend only how, so the CPU and the
GPU run the same forward. The recorder always receives host numpy arrays.

Legend: n = new positions in this call, H = hidden, h = query heads, kvh = KV heads,
hd = head_dim, E = experts, k = experts used per token, F = expert (moe) intermediate size, V = vocab.
"""

from __future__ import annotations

import numpy as np

from .config import Knobs
from .kv_cache import KVCache
from .model import Model
from .recorder import NULL_RECORDER, Recorder

DEFAULT_KNOBS = Knobs()


def final_norm(model: Model, x):
    """The final RMSNorm of the residual stream (m, H) -> (m, H), on the model's backend."""
    return model.backend.rmsnorm(x, model.output_norm, model.config.rms_eps)


def lm_head(model: Model, normed):
    """(m, H) -> logits (m, V) with output.weight, or token_embd.weight when the file ties them.

    The forward ends with final_norm then lm_head; the logit lens applies both to earlier layers.
    """
    return model.backend.linear(model.output, normed)


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

    Returns float32 logits (n, V) on the host when `all_logits` (or the recorder asks for them), else
    (1, V) for the last position. Token ids must already be validated (engine.session does it).
    """
    cfg = model.config
    be = model.backend
    rec = recorder
    if cache.backend is not be:
        raise ValueError(f"the KV cache belongs to the {cache.backend.name} backend but the model runs on "
                         f"{be.name}: make it with KVCache.for_model(model, capacity)")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    cache.reserve(n)
    p0 = cache.length
    positions = np.arange(p0, p0 + n, dtype=np.int64)
    h_, kvh, hd, k_used = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts_used
    eps = cfg.rms_eps
    theta = knobs.rope_theta if knobs.rope_theta is not None else cfg.rope_theta
    rope = be.rope_tables(positions, hd, theta)  # cos, sin (n, hd/2)

    def record(layer, slot, x):
        rec.slot(layer, slot, positions, be.stats(x), be.to_host(x) if rec.capture_vectors else None)

    # token embeddings
    x = be.embed(model.token_embd, tokens)  # (n, H) the residual stream
    if rec.enabled:
        record(None, "embedding", x)

    for i, L in enumerate(model.layers):
        # attention rmsnorm
        h = be.rmsnorm(x, L.attn_norm, eps)  # (n, H)
        # qkv matmuls for these positions
        q = be.linear(L.attn_q, h)  # (n, h*hd)
        k = be.linear(L.attn_k, h)  # (n, kvh*hd)
        v = be.linear(L.attn_v, h)  # (n, kvh*hd)
        if rec.enabled:
            record(i, "attn_norm", h)
            record(i, "qkv", be.concat((q, k, v)))
        q = q.reshape(n, h_, hd)
        k = k.reshape(n, kvh, hd)
        # per-head RMSNorm of q and k over head_dim, before RoPE (unlike llama: Qwen3 has it)
        if knobs.qk_norm:
            q = be.rmsnorm(q, L.attn_q_norm, eps)
            k = be.rmsnorm(k, L.attn_k_norm, eps)
        # rotary position embedding, NeoX style (two halves of each head)
        q = be.rope(q, rope)
        k = be.rope(k, rope)
        # save key, value at these positions to the kv cache; causal GQA attention over every position so far
        attn = be.attend(cache, i, q, k, v.reshape(n, kvh, hd), p0)  # (n, h, hd)
        o = be.linear(L.attn_output, attn.reshape(n, h_ * hd))  # (n, H)
        if rec.enabled:
            record(i, "attn_out", o)
        # residual connection back into x: x = x + o
        x = be.add(x, o)

        # ffn rmsnorm
        h = be.rmsnorm(x, L.ffn_norm, eps)  # (n, H)
        # router: softmax over all experts, top-k, renormalise the k weights (norm_topk_prob)
        router_logits = be.linear(L.ffn_gate_inp, h)  # (n, E)
        routing_weights, selected_experts, expert_weights = be.route(router_logits, k_used, knobs.norm_topk_prob)
        # experts: y = sum_k w_k * down_k(silu(gate_k h) * up_k h); only the selected experts' rows are read
        gate = be.experts(L.ffn_gate_exps, selected_experts, h)  # (n, k, F)
        up = be.experts(L.ffn_up_exps, selected_experts, h)  # (n, k, F)
        down = be.experts(L.ffn_down_exps, selected_experts, be.swiglu(gate, up))  # (n, k, H)
        y = be.weighted_sum(expert_weights, down)  # (n, H)
        if rec.enabled:
            record(i, "ffn_norm", h)
            rec.router(i, positions, be.to_host(router_logits), be.to_host(routing_weights),
                       be.to_host(selected_experts), be.to_host(expert_weights))
            record(i, "ffn_out", y)
        # residual connection back into x: x = x + y
        x = be.add(x, y)
        if rec.enabled:
            record(i, "output", x)

    # final rmsnorm and the lm_head
    x = final_norm(model, x)  # (n, H)
    if rec.enabled:
        record(None, "final_norm", x)
    m = n if (all_logits or rec.all_logits) else 1
    logits = be.to_host(lm_head(model, be.last_rows(x, m)))  # (n or 1, V)
    if rec.enabled:
        rec.logits(positions[-m:], logits)
    cache.length = p0 + n
    return logits
