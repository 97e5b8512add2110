"""TraceView: what the pages draw, built from a live trace, a stored run or an uploaded payload.

Legend: L = layers, P = positions (P = 1 for a payload, which carries the last position only),
E = experts, k = experts used, K = top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.recorder import STAT_FIELDS
from engine.recorder import LAYER_SLOTS

STD = STAT_FIELDS.index("std_dev")
NAN = STAT_FIELDS.index("nan_count")
INF = STAT_FIELDS.index("inf_count")


@dataclass
class TraceView:
    model_name: str
    prompt: str | None
    tokens: list[int]
    token_texts: list[str]
    config: dict
    knobs: dict
    stats: dict  # slot -> float64 (L, P, 10)
    selected: np.ndarray  # int (L, P, k)
    weights: np.ndarray  # float (L, P, k)
    probs: np.ndarray | None  # float (L, P, E) full router softmax, when known
    top_ids: list[int]
    top_texts: list[str]
    top_probs: list[float]
    top_logits: list[float]
    positions: list[int] = field(default_factory=list)
    source: str = "engine"
    lens_outputs: dict = field(default_factory=dict)  # layer -> float32 (H,) output at the last position
    payload: dict | None = None  # the exportable JSON payload, when built from a live trace

    @property
    def n_layers(self) -> int:
        return self.selected.shape[0]

    def std_last(self) -> dict[str, np.ndarray]:
        """slot -> (L,) std at the last position (the upstream view)."""
        return {s: self.stats[s][:, -1, STD] for s in LAYER_SLOTS if s in self.stats}

    def std_mean(self) -> dict[str, np.ndarray]:
        """slot -> (L,) std averaged over positions."""
        return {s: np.nanmean(self.stats[s][:, :, STD], axis=1) for s in LAYER_SLOTS if s in self.stats}

    def nonfinite_last(self) -> dict[str, np.ndarray]:
        return {s: (self.stats[s][:, -1, NAN] + self.stats[s][:, -1, INF]).astype(int) for s in self.stats}

    def std_grid(self, slot: str) -> np.ndarray:
        """(L, P) std of one slot at every layer and position."""
        return self.stats[slot][:, :, STD]


def from_recorder(rec, model, tokens, *, prompt: str | None, knobs) -> TraceView:
    """A live trace (traces.recorder.TraceRecorder) of `model` over `tokens`."""
    L = model.config.n_layers
    tok = model.tokenizer
    texts = [tok.token_text(int(t)) for t in tokens] if tok is not None else [str(t) for t in tokens]
    stats = {s: np.stack([rec.stats(i, s) for i in range(L)]) for s in LAYER_SLOTS}
    last = rec.logits_records[-1]
    return TraceView(
        model_name=model.name, prompt=prompt, tokens=[int(t) for t in tokens], token_texts=texts,
        config=model.config.to_dict(), knobs=knobs.to_dict(), stats=stats,
        selected=np.stack([rec.router_array(i, "selected_experts") for i in range(L)]),
        weights=np.stack([rec.router_array(i, "expert_weights") for i in range(L)]),
        probs=np.stack([rec.router_array(i, "routing_weights") for i in range(L)]),
        top_ids=[int(i) for i in last.top_ids],
        top_texts=[tok.token_text(int(i)) if tok is not None else str(int(i)) for i in last.top_ids],
        top_probs=[float(p) for p in last.top_probs], top_logits=[float(x) for x in last.top_logits],
        positions=list(rec.positions),
    )


def from_payload(payload: dict) -> TraceView:
    """An exported payload: last-position stats per layer, router choices at every position, top-k."""
    from traces.payload import stats_from_json

    L = payload["num_layers"]
    stats = {s: np.stack([stats_from_json(layer[s]) for layer in payload["layers"]])[:, None, :] for s in LAYER_SLOTS}
    router = sorted(payload.get("router") or [], key=lambda r: r["layer_idx"])
    if len(router) == L and router[0]["positions"]:
        selected = np.array([[p["selected_experts"] for p in r["positions"]] for r in router])
        weights = np.array([[[np.nan if w is None else w for w in p["weights"]] for p in r["positions"]]
                            for r in router], dtype=np.float64)
    else:
        selected = np.zeros((L, 0, 0), dtype=np.int64)
        weights = np.zeros((L, 0, 0))
    top = payload["logits"]["top_k"]
    tokens = payload["encoded_tokens"]
    return TraceView(
        model_name=(payload.get("model") or {}).get("name", "?"), prompt=payload.get("prompt"), tokens=tokens,
        token_texts=payload.get("token_texts") or [str(t) for t in tokens], config=payload.get("config") or {},
        knobs=payload.get("knobs") or {}, stats=stats, selected=selected, weights=weights, probs=None,
        top_ids=[t["token_id"] for t in top], top_texts=[t.get("text") or str(t["token_id"]) for t in top],
        top_probs=[t.get("prob") or 0.0 for t in top], top_logits=[t.get("logit") for t in top],
        positions=list(range(len(tokens))), source="payload",
    )


def from_run(run) -> TraceView:
    """A stored run (traces.store.Run): statistics at every position, the router, the top-k at the last position."""
    L = run.n_layers
    meta = run.meta
    stats = {}
    for s in LAYER_SLOTS:
        per_layer = [run.stats(i, s) for i in range(L)]
        if all(p is not None for p in per_layer):
            stats[s] = np.stack([p.stats for p in per_layer])
    r = run.router
    lg = run.logits
    texts = lg.texts[-1] if lg.texts else [None] * len(lg.ids[-1])
    tokens = run.tokens
    return TraceView(
        model_name=(meta.get("model") or {}).get("name", "?"), prompt=meta.get("prompt"), tokens=tokens,
        token_texts=meta.get("token_texts") or [str(t) for t in tokens], config=meta.get("config") or {},
        knobs=meta.get("knobs") or {}, stats=stats,
        selected=r.selected if r is not None else np.zeros((L, 0, 0), dtype=np.int64),
        weights=r.weights if r is not None else np.zeros((L, 0, 0)),
        probs=r.probs if r is not None else None,
        top_ids=[int(i) for i in lg.ids[-1]], top_texts=[t if t is not None else str(int(i)) for t, i in
                                                         zip(texts, lg.ids[-1])],
        top_probs=[float(p) for p in lg.probs[-1]], top_logits=[float(x) for x in lg.logits[-1]],
        positions=list(range(len(tokens))), source=run.source,
    )
