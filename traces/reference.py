"""The Hugging Face reference: `Qwen3MoeForCausalLM` (torch, CPU, float32, eager attention) built
from a GGUF file's dequantized tensors, so our engine can be compared with code no one here wrote.

Pitfalls (shared/docs/qwen3moe.md): transformers' own `gguf_file=` loader ignores
`qwen3moe.expert_feed_forward_length` and leaves norm_topk_prob False, so the config is built here
from the metadata; tensors are dequantized with gguf-py (`gguf.quants.dequantize`), the oracle
for every block format. This dequantizes whole tensors: it is a reference for small and medium
files, not a way to run the 17 GB model.

Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import WorkbenchError
from engine.model import Model


def _require():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise WorkbenchError(
            f"the reference run needs torch and transformers (pip install '.[reference]'): {exc.name} is missing"
        ) from None


def dequantize(t) -> np.ndarray:
    """Whole tensor -> float32 in numpy (rows, cols) / (E, rows, cols) order, via gguf-py."""
    from gguf.quants import dequantize as gguf_dequantize

    return np.ascontiguousarray(gguf_dequantize(t.raw, t.qtype), dtype=np.float32).reshape(t.shape)


def hf_config(model: Model, *, rope_theta: float | None = None, norm_topk_prob: bool = True):
    from transformers import Qwen3MoeConfig

    c = model.config
    theta = float(rope_theta if rope_theta is not None else c.rope_theta)
    cfg = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.moe_ff,
        moe_intermediate_size=c.moe_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rms_eps, num_experts=c.n_experts, num_experts_per_tok=c.n_experts_used,
        norm_topk_prob=norm_topk_prob, tie_word_embeddings=c.tie_embeddings, decoder_sparse_step=1,
        mlp_only_layers=[], attention_bias=False, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_hf_model(model: Model, *, rope_theta: float | None = None, norm_topk_prob: bool = True):
    """A float32 `Qwen3MoeForCausalLM` holding the GGUF's weights, dequantized by gguf-py."""
    _require()
    import torch
    from transformers import Qwen3MoeForCausalLM

    from engine.gguf_file import open_gguf

    f = open_gguf(model.path)
    T = f.tensors
    cfg = hf_config(model, rope_theta=rope_theta, norm_topk_prob=norm_topk_prob)
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": dequantize(T["token_embd.weight"]),
          "model.norm.weight": dequantize(T["output_norm.weight"])}
    sd["lm_head.weight"] = dequantize(T["output.weight"]) if "output.weight" in T else sd["model.embed_tokens.weight"]
    for i in range(model.config.n_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = dequantize(T[b + "attn_norm.weight"])
        sd[p + "self_attn.q_proj.weight"] = dequantize(T[b + "attn_q.weight"])
        sd[p + "self_attn.k_proj.weight"] = dequantize(T[b + "attn_k.weight"])
        sd[p + "self_attn.v_proj.weight"] = dequantize(T[b + "attn_v.weight"])
        sd[p + "self_attn.o_proj.weight"] = dequantize(T[b + "attn_output.weight"])
        sd[p + "self_attn.q_norm.weight"] = dequantize(T[b + "attn_q_norm.weight"])
        sd[p + "self_attn.k_norm.weight"] = dequantize(T[b + "attn_k_norm.weight"])
        sd[p + "post_attention_layernorm.weight"] = dequantize(T[b + "ffn_norm.weight"])
        sd[p + "mlp.gate.weight"] = dequantize(T[b + "ffn_gate_inp.weight"])
        gate, up = dequantize(T[b + "ffn_gate_exps.weight"]), dequantize(T[b + "ffn_up_exps.weight"])
        sd[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)  # (E, 2F, H)
        sd[p + "mlp.experts.down_proj"] = dequantize(T[b + "ffn_down_exps.weight"])  # (E, H, F)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(tensors, strict=False, assign=True)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise WorkbenchError(f"reference model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.eval()
    # non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf


@dataclass
class ReferenceOutput:
    """What the HF model computed for one prompt; n = positions, H = hidden, E = experts, k = used.

    slots[(layer, slot)] float32 (n, d) for the six per-layer slots, observed with forward hooks on
    HF's own modules; slots[(None, 'embedding')] and slots[(None, 'final_norm')] likewise.
    """

    logits: np.ndarray  # (n, V)
    slots: dict
    router_logits: list[np.ndarray]  # per layer (n, E)
    selected_experts: list[np.ndarray]  # per layer (n, k), HF's own top-k
    expert_weights: list[np.ndarray]  # per layer (n, k)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_reference(hf, tokens) -> ReferenceOutput:
    """Run `tokens` through the HF model once, capturing every slot with forward hooks."""
    import torch

    n = len(tokens)
    slots: dict = {}
    router: dict = {}
    handles = []

    def keep(key):
        def hook(_module, _inputs, output):
            slots[key] = _first(output).detach().float().reshape(n, -1).numpy().copy()
        return hook

    def keep_router(layer):
        def hook(_module, _inputs, output):
            logits, scores, indices = output
            router[layer] = (logits.detach().float().reshape(n, -1).numpy().copy(),
                             indices.detach().reshape(n, -1).numpy().astype(np.int32),
                             scores.detach().float().reshape(n, -1).numpy().copy())
        return hook

    m = hf.model
    handles.append(m.embed_tokens.register_forward_hook(keep((None, "embedding"))))
    handles.append(m.norm.register_forward_hook(keep((None, "final_norm"))))
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        handles.append(layer.input_layernorm.register_forward_hook(keep((i, "attn_norm"))))
        for proj in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(a, proj).register_forward_hook(keep((i, proj))))
        handles.append(a.o_proj.register_forward_hook(keep((i, "attn_out"))))
        handles.append(layer.post_attention_layernorm.register_forward_hook(keep((i, "ffn_norm"))))
        handles.append(layer.mlp.register_forward_hook(keep((i, "ffn_out"))))
        handles.append(layer.mlp.gate.register_forward_hook(keep_router(i)))
        handles.append(layer.register_forward_hook(keep((i, "output"))))
    ids = torch.tensor([list(map(int, tokens))], dtype=torch.long)
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(m.layers)):
        slots[(i, "qkv")] = np.concatenate([slots.pop((i, p)) for p in ("q_proj", "k_proj", "v_proj")], axis=1)
    L = len(m.layers)
    return ReferenceOutput(
        logits=out.logits[0].detach().float().numpy().copy(),
        slots=slots,
        router_logits=[router[i][0] for i in range(L)],
        selected_experts=[router[i][1] for i in range(L)],
        expert_weights=[router[i][2] for i in range(L)],
    )
