"""The trace payload: a JSON object, a superset of the upstream `apr trace --json --payload` schema.

Upstream fields, same names: format, architecture, num_layers, hidden_dim, vocab_size, num_heads,
num_kv_heads, prompt, encoded_tokens, embedding, layers[] {layer_idx, attn_norm, qkv, attn_out,
ffn_norm, ffn_out, output}, final_norm, logits_stats, logits {vocab_size, l2_norm, top_k[{token_id,
logit}]}. Per-layer stats are for the LAST position, as upstream.

Ours, added: schema_version, engine, model (path, name, size), config (with `sources`: file or
default), knobs, token_texts, top-k `prob` and `text`, `l2_norm` and `abs_max` in every stats
object, and `router` (per layer and position: selected experts, weights, router entropy).
Non-finite floats are written as null (JSON has no NaN); the counts say how many there were.
The JSON Schema is contracts/trace_payload.schema.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from engine.recorder import LAYER_SLOTS, STAT_FIELDS

from .recorder import TraceRecorder

SCHEMA_VERSION = 1
FORMAT_PREFIX = "GGUF"
INT_FIELDS = ("count", "nan_count", "inf_count", "zero_count")


def _num(v: float):
    v = float(v)
    return v if math.isfinite(v) else None


def stats_to_json(row: np.ndarray) -> dict:
    """A float64 (10,) stats row -> the upstream stats object (plus l2_norm, abs_max)."""
    out = {}
    for name, value in zip(STAT_FIELDS, row):
        out[name] = int(value) if name in INT_FIELDS else _num(value)
    return out


def stats_from_json(obj: dict) -> np.ndarray:
    return np.array(
        [np.nan if obj.get(name) is None else float(obj[name]) for name in STAT_FIELDS], dtype=np.float64
    )


def router_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of a (P, E) softmax."""
    p = np.clip(probs.astype(np.float64), 1e-30, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def engine_info(model, backend: str | None = None) -> dict:
    """Which engine computed a trace: name, version, backend (default: the model's)."""
    from engine import __version__

    return {"name": "moe-workbench", "version": __version__, "backend": backend or getattr(model.backend, "name", "cpu")}


def build_payload(model, recorder: TraceRecorder, tokens: Sequence[int], *, prompt: str | None, knobs,
                  top_k: int = 5, backend: str | None = None) -> dict:
    """Assemble the payload of one traced forward over `tokens`; `backend` defaults to the model's."""
    cfg = model.config
    tok = model.tokenizer
    last = -1
    texts = [tok.token_text(int(t)) for t in tokens] if tok is not None else None
    layers = []
    for i in range(cfg.n_layers):
        entry = {"layer_idx": i}
        for slot in LAYER_SLOTS:
            entry[slot] = stats_to_json(recorder.stats(i, slot)[last])
        layers.append(entry)
    router = []
    for i in recorder.router_layers:
        sel = recorder.router_array(i, "selected_experts")
        w = recorder.router_array(i, "expert_weights")
        ent = router_entropy(recorder.router_array(i, "routing_weights"))
        router.append({
            "layer_idx": i,
            "positions": [
                {"position": int(p), "selected_experts": sel[j].tolist(),
                 "weights": [_num(x) for x in w[j]], "entropy": _num(ent[j])}
                for j, p in enumerate(recorder.positions)
            ],
        })
    lr = recorder.logits_records[-1]
    k = min(top_k, len(lr.top_ids))
    top = [
        {"token_id": int(lr.top_ids[j]), "logit": _num(lr.top_logits[j]), "prob": _num(lr.top_probs[j]),
         "text": tok.token_text(int(lr.top_ids[j])) if tok is not None else None}
        for j in range(k)
    ]
    return {
        "format": f"{FORMAT_PREFIX} ({model.metadata.get('general.architecture')})",
        "architecture": model.metadata.get("general.architecture"),
        "num_layers": cfg.n_layers,
        "hidden_dim": cfg.hidden,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.n_heads,
        "num_kv_heads": cfg.n_kv_heads,
        "prompt": prompt,
        "encoded_tokens": [int(t) for t in tokens],
        "embedding": stats_to_json(recorder.stats(None, "embedding")[last]),
        "layers": layers,
        "final_norm": stats_to_json(recorder.stats(None, "final_norm")[last]),
        "logits_stats": stats_to_json(lr.stats),
        "logits": {"vocab_size": cfg.vocab_size, "l2_norm": _num(lr.stats[STAT_FIELDS.index("l2_norm")]),
                   "top_k": top},
        "schema_version": SCHEMA_VERSION,
        "engine": engine_info(model, backend),
        "model": {"path": str(model.path), "name": model.name, "file_size": model.file_size},
        "config": cfg.to_dict(),
        "knobs": knobs.to_dict(),
        "token_texts": texts,
        "router": router,
    }


def dumps(payload: dict) -> str:
    return json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=False)
