"""The run store: traces kept as evidence, one folder per run, readable with plain pyarrow, pandas or DuckDB.

    <store>/
      20250101-120000-3fa9c1/      a run: its id is the UTC creation time and 6 random hex digits
        meta.json                  what was run (model, fingerprint, config with sources, knobs, prompt,
                                   tokens, token texts, created, label, versions) and a manifest of the tables
        activations.parquet        layer, slot, position, the 10 stats     (every slot, every position)
        router.parquet             layer, position, rank, expert, weight, entropy
        router_probs.parquet       layer, position, probs list<float32>    (the full softmax, when captured)
        logits.parquet             position, rank, token_id, logit, prob, text
        vectors.parquet            layer, slot, position, values list<float32>   (with --capture vectors)
      .tmp.<pid>.<run id>.<host>/  a run being written (never listed; cleaned when its writer is gone)

Column types are the `*_SCHEMA` constants below; docs/store.md documents them for users. `layer` is null
for the model-level slots ('embedding', 'final_norm', 'logits'). Writes are atomic: every table and
meta.json go into a temporary folder beside the runs, each file is fsynced, then the folder, then it is
renamed into place and the store folder fsynced; a reader sees a complete run or none.
meta.json carries each table's size, row count and sha256: `ls` checks sizes and Parquet footers (cheap),
`load` checks the hashes, so a damaged file is reported as corrupt instead of read as data.

Legend: P = positions, L = layers, k = experts used, E = experts, K = stored top-k, d = a slot's width.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import WorkbenchError
from engine.recorder import LAYER_SLOTS, STAT_FIELDS

from .payload import (FORMAT_PREFIX, INT_FIELDS, SCHEMA_VERSION, engine_info, router_entropy, stats_from_json,
                      stats_to_json)

STORE_SCHEMA_VERSION = 1
MODEL_SLOTS_BEFORE = ("embedding",)
MODEL_SLOTS_AFTER = ("final_norm", "logits")
ROUTER_PROBS_MAX_EXPERTS = 256  # the full router softmax is kept by default up to this many experts
FINGERPRINT_CHUNK = 1 << 20
FINGERPRINT_ALGORITHM = "sha256(size as 8 bytes LE | first 1 MiB | last 1 MiB)"
PAYLOAD_FIELDS = ("format", "architecture", "num_layers", "hidden_dim", "vocab_size", "num_heads", "num_kv_heads",
                  "prompt", "encoded_tokens", "embedding", "layers", "final_norm", "logits_stats", "logits",
                  "schema_version", "engine", "model", "config", "knobs", "token_texts", "router")
STALE_SECONDS = 600  # a temporary folder untouched this long, whose writer we cannot see, is abandoned
MAX_LABEL = 200
RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
TMP_PREFIX = ".tmp."

_stat_types = [(name, pa.int64() if name in INT_FIELDS else pa.float64()) for name in STAT_FIELDS]
ACTIVATIONS_SCHEMA = pa.schema([("layer", pa.int16()), ("slot", pa.string()), ("position", pa.int32()), *_stat_types])
ROUTER_SCHEMA = pa.schema([("layer", pa.int16()), ("position", pa.int32()), ("rank", pa.int16()),
                          ("expert", pa.int32()), ("weight", pa.float32()), ("entropy", pa.float64())])
ROUTER_PROBS_SCHEMA = pa.schema([("layer", pa.int16()), ("position", pa.int32()), ("probs", pa.list_(pa.float32()))])
LOGITS_SCHEMA = pa.schema([("position", pa.int32()), ("rank", pa.int16()), ("token_id", pa.int32()),
                          ("logit", pa.float32()), ("prob", pa.float32()), ("text", pa.string())])
VECTORS_SCHEMA = pa.schema([("layer", pa.int16()), ("slot", pa.string()), ("position", pa.int32()),
                           ("values", pa.list_(pa.float32()))])
TABLES = {"activations": ACTIVATIONS_SCHEMA, "router": ROUTER_SCHEMA, "router_probs": ROUTER_PROBS_SCHEMA,
          "logits": LOGITS_SCHEMA, "vectors": VECTORS_SCHEMA}
REQUIRED_TABLES = ("activations", "router", "logits")


class StoreError(WorkbenchError):
    """A run that does not exist, is ambiguous, is corrupt, or could not be written."""


def forward_order(n_layers: int) -> list[tuple[int | None, str]]:
    """Every (layer, slot) in the order the forward computes them; layer None for model-level slots."""
    keys: list[tuple[int | None, str]] = [(None, s) for s in MODEL_SLOTS_BEFORE]
    keys += [(i, s) for i in range(n_layers) for s in LAYER_SLOTS]
    keys += [(None, s) for s in MODEL_SLOTS_AFTER]
    return keys


def default_root() -> Path:
    """$TRACE_STORE, else $XDG_DATA_HOME/moe-workbench/runs, else ~/.local/share/moe-workbench/runs."""
    env = os.environ.get("TRACE_STORE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "moe-workbench" / "runs"


def fingerprint(path: str | os.PathLike) -> dict:
    """A content fingerprint that stays cheap on a 17 GB file: sha256 of the size, the first and the last MiB.

    Not a full-file hash: two files equal in size, head and tail but different in between get the same
    fingerprint. It tells different quantizations and different models apart, which is what diffs need.
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(p, "rb") as f:
        h.update(f.read(FINGERPRINT_CHUNK))
        if size > FINGERPRINT_CHUNK:
            f.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
            h.update(f.read(FINGERPRINT_CHUNK))
    return {"algorithm": FINGERPRINT_ALGORITHM, "sha256": h.hexdigest()}


def package_versions(extra: Sequence[str] = ()) -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("moe-workbench", "numpy", "numba", "gguf", "pyarrow", *extra):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def check_label(label: str | None) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str) or len(label) > MAX_LABEL or any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise StoreError(f"a label is at most {MAX_LABEL} printable characters, got {label!r:.60}")
    return label


# ---------------------------------------------------------------------------------------------------
# the run


@dataclass
class SlotStats:
    positions: np.ndarray  # int32 (n,)
    stats: np.ndarray  # float64 (n, 10) in STAT_FIELDS order


@dataclass
class RouterData:
    positions: np.ndarray  # int32 (P,)
    selected: np.ndarray  # int32 (L, P, k), by descending probability
    weights: np.ndarray  # float32 (L, P, k), as used (renormalised when norm_topk_prob)
    entropy: np.ndarray  # float64 (L, P), nats, of the full softmax
    probs: np.ndarray | None = None  # float32 (L, P, E), the full softmax, when captured


@dataclass
class LogitsData:
    positions: np.ndarray  # int32 (m,) positions that produced logits
    ids: np.ndarray  # int64 (m, K) top-k token ids, descending
    logits: np.ndarray  # float32 (m, K)
    probs: np.ndarray  # float32 (m, K), softmax over the whole vocabulary
    texts: list  # (m, K) of str | None


@dataclass
class Run:
    """One stored trace. `meta` is meta.json (less the manifest); the arrays are the Parquet tables.

    activations[(layer, slot)]: SlotStats; vectors[(layer, slot)]: (positions int32 (n,), float32 (n, d)).
    Layer None is a model-level slot ('embedding', 'final_norm', 'logits').
    A payload-derived run (`from_payload`) has statistics at the last position only, as the payload does.
    """

    meta: dict
    activations: dict[tuple[int | None, str], SlotStats]
    router: RouterData | None
    logits: LogitsData
    vectors: dict[tuple[int | None, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        return self.meta.get("id")

    @property
    def label(self) -> str | None:
        return self.meta.get("label")

    @property
    def tokens(self) -> list[int]:
        return list(self.meta["tokens"])

    @property
    def n_layers(self) -> int:
        return int(self.meta["config"]["n_layers"])

    @property
    def source(self) -> str:
        return self.meta.get("source", "engine")

    def stats(self, layer: int | None, slot: str) -> SlotStats | None:
        return self.activations.get((layer, slot))

    def vector(self, layer: int | None, slot: str):
        """(positions int32 (n,), float32 (n, d)) or None when the run did not capture this slot."""
        return self.vectors.get((layer, slot))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_trace(cls, model, recorder, tokens: Sequence[int], *, prompt: str | None, knobs, label: str | None = None,
                   source: str = "engine", backend: str | None = None, router_probs: bool | None = None,
                   extra_versions: Sequence[str] = ()) -> "Run":
        """A run from a traces.recorder.TraceRecorder filled by one forward over `tokens`.

        router_probs: keep the full router softmax (None: when the model has <= ROUTER_PROBS_MAX_EXPERTS).
        """
        cfg = model.config
        rec = recorder
        tok = model.tokenizer
        positions = np.asarray(rec.positions, dtype=np.int32)
        if positions.size == 0:
            raise StoreError("the trace recorded no positions")
        activations: dict = {}
        absent = []
        for key in forward_order(cfg.n_layers):
            if key[1] == "logits":
                continue
            if rec.has(*key):
                activations[key] = SlotStats(positions, rec.stats(*key).astype(np.float64))
            else:
                absent.append([key[0], key[1]])
        lr = rec.logits_records
        if not lr:
            raise StoreError("the trace recorded no logits")
        activations[(None, "logits")] = SlotStats(np.array([r.position for r in lr], dtype=np.int32),
                                                  np.stack([r.stats for r in lr]).astype(np.float64))
        K = min(len(r.top_ids) for r in lr)
        ids = np.stack([r.top_ids[:K] for r in lr]).astype(np.int64)
        logits = LogitsData(
            positions=np.array([r.position for r in lr], dtype=np.int32), ids=ids,
            logits=np.stack([r.top_logits[:K] for r in lr]).astype(np.float32),
            probs=np.stack([r.top_probs[:K] for r in lr]).astype(np.float32),
            texts=[[tok.token_text(int(t)) if tok is not None else None for t in row] for row in ids],
        )
        router = None
        if rec.router_layers:
            layers = rec.router_layers
            probs = np.stack([rec.router_array(i, "routing_weights") for i in layers]).astype(np.float32)
            keep = router_probs if router_probs is not None else cfg.n_experts <= ROUTER_PROBS_MAX_EXPERTS
            router = RouterData(
                positions=positions,
                selected=np.stack([rec.router_array(i, "selected_experts") for i in layers]).astype(np.int32),
                weights=np.stack([rec.router_array(i, "expert_weights") for i in layers]).astype(np.float32),
                entropy=router_entropy(probs), probs=probs if keep else None,
            )
        vectors = {}
        for key in rec.vector_keys:
            v = rec.vectors(*key)
            vectors[key] = (positions[-v.shape[0]:], np.ascontiguousarray(v, dtype=np.float32))
        texts = [tok.token_text(int(t)) for t in tokens] if tok is not None else None
        meta = {
            "schema_version": STORE_SCHEMA_VERSION,
            "id": None,
            "label": check_label(label),
            "created": _utc_now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "source": source,
            "model": {"path": str(model.path), "name": model.name, "file_size": int(model.file_size),
                      "fingerprint": fingerprint(model.path),
                      "architecture": model.metadata.get("general.architecture")},
            "engine": engine_info(model, backend),
            "config": cfg.to_dict(),
            "knobs": knobs.to_dict(),
            "prompt": prompt,
            "tokens": [int(t) for t in tokens],
            "token_texts": texts,
            "top_k": int(K),
            "captured": {"vectors": sorted([_key_json(k) for k in vectors], key=_key_order(cfg.n_layers)),
                         "router_probs": router is not None and router.probs is not None,
                         "positions": "all"},
            "absent_slots": absent,
            "versions": package_versions(extra_versions),
        }
        return cls(meta=meta, activations=activations, router=router, logits=logits, vectors=vectors)

    @classmethod
    def from_reference(cls, model, tokens: Sequence[int], ref, *, prompt: str | None, knobs=None,
                       label: str | None = None, capture_vectors: bool = True, top_k: int = 20) -> "Run":
        """A run (source 'reference') from traces.reference.ReferenceOutput: what Hugging Face computed.

        Statistics are computed here from the vectors HF's hooks observed; a slot HF did not expose is
        absent (listed in meta['absent_slots']), never zero. Router softmax and top-k come from HF's
        router logits and its own selection.
        """
        from engine.config import Knobs
        from engine.kernels import activation_stats
        from engine.ops import softmax

        from .recorder import TraceRecorder

        knobs = knobs if knobs is not None else Knobs()
        n = len(tokens)
        positions = np.arange(n, dtype=np.int64)
        rec = TraceRecorder(capture_vectors=capture_vectors, all_logits=True, top_k=top_k)
        for key in forward_order(model.config.n_layers):
            v = ref.slots.get(key)
            if v is not None:
                v = np.ascontiguousarray(v, dtype=np.float32).reshape(n, -1)  # (n, d)
                rec.slot(key[0], key[1], positions, activation_stats(v), v)
        if not rec.positions:  # the embedding was not observed: positions are still 0..n-1
            rec.positions = [int(p) for p in positions]
        for i, logits in enumerate(ref.router_logits):
            logits = np.asarray(logits, dtype=np.float32)
            rec.router(i, positions, logits, softmax(logits), np.asarray(ref.selected_experts[i], dtype=np.int32),
                       np.asarray(ref.expert_weights[i], dtype=np.float32))
        rec.logits(positions, np.asarray(ref.logits, dtype=np.float32))
        return cls.from_trace(model, rec, tokens, prompt=prompt, knobs=knobs, label=label, source="reference",
                              backend="transformers", extra_versions=("torch", "transformers"))

    @classmethod
    def from_payload(cls, payload: dict, *, label: str | None = None) -> "Run":
        """A run from an exported JSON payload: stats at the last position, router at every position."""
        try:
            return cls._from_payload(payload, label)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise StoreError(f"not a trace payload this workbench can read: {type(exc).__name__} {exc}") from None

    @classmethod
    def _from_payload(cls, p: dict, label) -> "Run":
        if not isinstance(p, dict) or "layers" not in p or "encoded_tokens" not in p:
            raise StoreError("not a trace payload: it has no 'layers' or 'encoded_tokens'")
        tokens = [int(t) for t in p["encoded_tokens"]]
        if not tokens:
            raise StoreError("the payload has no tokens")
        last = np.array([len(tokens) - 1], dtype=np.int32)
        n_layers = int(p["num_layers"])
        activations = {(None, "embedding"): SlotStats(last, stats_from_json(p["embedding"])[None])}
        for entry in p["layers"]:
            for slot in LAYER_SLOTS:
                activations[(int(entry["layer_idx"]), slot)] = SlotStats(last, stats_from_json(entry[slot])[None])
        activations[(None, "final_norm")] = SlotStats(last, stats_from_json(p["final_norm"])[None])
        activations[(None, "logits")] = SlotStats(last, stats_from_json(p["logits_stats"])[None])
        top = p["logits"]["top_k"]
        logits = LogitsData(
            positions=last, ids=np.array([[t["token_id"] for t in top]], dtype=np.int64),
            logits=np.array([[_nan(t["logit"]) for t in top]], dtype=np.float32),
            probs=np.array([[_nan(t["prob"]) for t in top]], dtype=np.float32),
            texts=[[t.get("text") for t in top]],
        )
        texts = p.get("token_texts")
        if texts is not None and len(texts) != len(tokens):
            raise StoreError(f"the payload has {len(texts)} token_texts for {len(tokens)} encoded_tokens")
        router = None
        rl = sorted(p.get("router") or [], key=lambda r: r["layer_idx"])
        for r in rl:  # the pages index token texts by these positions
            bad = [q["position"] for q in r["positions"] if not 0 <= int(q["position"]) < len(tokens)]
            if bad or len(r["positions"]) > len(tokens):
                raise StoreError(f"router layer {r['layer_idx']} has {len(r['positions'])} positions for "
                                 f"{len(tokens)} tokens" + (f" (position {bad[0]} is out of range)" if bad else ""))
        if rl and rl[0]["positions"]:
            router = RouterData(
                positions=np.array([q["position"] for q in rl[0]["positions"]], dtype=np.int32),
                selected=np.array([[q["selected_experts"] for q in r["positions"]] for r in rl], dtype=np.int32),
                weights=np.array([[[_nan(w) for w in q["weights"]] for q in r["positions"]] for r in rl],
                                 dtype=np.float32),
                entropy=np.array([[_nan(q["entropy"]) for q in r["positions"]] for r in rl], dtype=np.float64),
            )
        config = dict(p.get("config") or {})
        config.setdefault("n_layers", n_layers)
        model = dict(p.get("model") or {})
        meta = {
            "schema_version": STORE_SCHEMA_VERSION,
            "id": None,
            "label": check_label(label),
            "created": _utc_now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "source": "payload",
            "model": {"path": model.get("path"), "name": model.get("name"), "file_size": model.get("file_size"),
                      "fingerprint": None, "architecture": p.get("architecture")},
            "engine": p.get("engine"),
            "config": config,
            "knobs": p.get("knobs") or {},
            "prompt": p.get("prompt"),
            "tokens": tokens,
            "token_texts": p.get("token_texts"),
            "top_k": len(top),
            "captured": {"vectors": [], "router_probs": False, "positions": "last"},
            "absent_slots": [],
            "payload_dims": {k: p.get(k) for k in ("format", "hidden_dim", "vocab_size", "num_heads",
                                                   "num_kv_heads", "schema_version")},
            "payload_extra": {k: v for k, v in p.items() if k not in PAYLOAD_FIELDS},  # kept, written back as is
            "versions": {},
        }
        return cls(meta=meta, activations=activations, router=router, logits=logits)

    # -- the payload ------------------------------------------------------------------------------
    def to_payload(self, top_k: int = 5) -> dict:
        """The JSON payload of this run: equal to traces.payload.build_payload of the same trace."""
        m = self.meta
        cfg = m["config"]
        dims = m.get("payload_dims") or {}
        if top_k > m["top_k"]:
            raise StoreError(f"run {self.id or ''} keeps the top {m['top_k']} logits; --top-k {top_k} asks for more")
        arch = m["model"].get("architecture")

        def last(layer, slot):
            s = self.activations.get((layer, slot))
            if s is None:  # a slot the run could not observe: count 0, every value null
                return {name: 0 if name in INT_FIELDS else None for name in STAT_FIELDS}
            return stats_to_json(s.stats[-1])

        layers = []
        for i in range(self.n_layers):
            entry = {"layer_idx": i}
            for slot in LAYER_SLOTS:
                entry[slot] = last(i, slot)
            layers.append(entry)
        router = []
        r = self.router
        if r is not None:
            for li in range(r.selected.shape[0]):
                router.append({
                    "layer_idx": li,
                    "positions": [
                        {"position": int(pos), "selected_experts": r.selected[li, j].tolist(),
                         "weights": [_num(x) for x in r.weights[li, j]], "entropy": _num(r.entropy[li, j])}
                        for j, pos in enumerate(r.positions)
                    ],
                })
        lg = self.logits
        top = [{"token_id": int(lg.ids[-1, j]), "logit": _num(lg.logits[-1, j]), "prob": _num(lg.probs[-1, j]),
                "text": lg.texts[-1][j]} for j in range(min(top_k, lg.ids.shape[1]))]
        logits_stats = self.activations[(None, "logits")].stats[-1]
        payload = {
            "format": dims.get("format") or f"{FORMAT_PREFIX} ({arch})",
            "architecture": arch,
            "num_layers": cfg["n_layers"],
            "hidden_dim": cfg.get("hidden", dims.get("hidden_dim")),
            "vocab_size": cfg.get("vocab_size", dims.get("vocab_size")),
            "num_heads": cfg.get("n_heads", dims.get("num_heads")),
            "num_kv_heads": cfg.get("n_kv_heads", dims.get("num_kv_heads")),
            "prompt": m["prompt"],
            "encoded_tokens": list(m["tokens"]),
            "embedding": last(None, "embedding"),
            "layers": layers,
            "final_norm": last(None, "final_norm"),
            "logits_stats": stats_to_json(logits_stats),
            "logits": {"vocab_size": cfg.get("vocab_size", dims.get("vocab_size")),
                       "l2_norm": _num(logits_stats[STAT_FIELDS.index("l2_norm")]), "top_k": top},
            "schema_version": dims.get("schema_version", SCHEMA_VERSION),
            "engine": m["engine"],
            "model": {"path": m["model"]["path"], "name": m["model"]["name"], "file_size": m["model"]["file_size"]},
            "config": cfg,
            "knobs": m["knobs"],
            "token_texts": m["token_texts"],
            "router": router,
        }
        payload.update(m.get("payload_extra") or {})
        return payload

    # -- tables -----------------------------------------------------------------------------------
    def tables(self) -> dict[str, pa.Table]:
        """The Parquet tables of this run (router_probs and vectors only when captured)."""
        out = {"activations": _activations_table(self.activations, self.n_layers),
               "router": _router_table(self.router), "logits": _logits_table(self.logits)}
        if self.router is not None and self.router.probs is not None:
            out["router_probs"] = _router_probs_table(self.router)
        if self.vectors:
            out["vectors"] = _vectors_table(self.vectors, self.n_layers)
        return out

    @classmethod
    def from_tables(cls, meta: dict, tables: dict[str, pa.Table]) -> "Run":
        for name, table in tables.items():
            _check_schema(name, table)
        act = _read_activations(tables["activations"])
        router = _read_router(tables["router"], tables.get("router_probs"))
        logits = _read_logits(tables["logits"])
        vectors = _read_vectors(tables["vectors"]) if "vectors" in tables else {}
        return cls(meta=meta, activations=act, router=router, logits=logits, vectors=vectors)


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _nan(v):
    return np.nan if v is None else float(v)


def _key_json(key) -> list:
    return [key[0], key[1]]


def _key_order(n_layers: int):
    order = {k: i for i, k in enumerate(forward_order(n_layers))}
    return lambda k: order.get((k[0], k[1]), len(order))


def _ordered(keys, n_layers: int) -> list:
    rank = _key_order(n_layers)
    return sorted(keys, key=lambda k: rank(k))


def _layer_array(layers: np.ndarray) -> pa.Array:
    """int (n,) with -1 for model-level slots -> int16 with nulls there."""
    return pa.array(layers.astype(np.int16), type=pa.int16(), mask=layers < 0)


def _activations_table(activations: dict, n_layers: int) -> pa.Table:
    keys = _ordered(activations, n_layers)
    layer = np.concatenate([np.full(len(activations[k].positions), -1 if k[0] is None else k[0]) for k in keys])
    slot = [k[1] for k in keys for _ in range(len(activations[k].positions))]
    pos = np.concatenate([activations[k].positions for k in keys]).astype(np.int32)
    stats = np.concatenate([activations[k].stats for k in keys], axis=0)
    cols = [_layer_array(layer), pa.array(slot, type=pa.string()), pa.array(pos, type=pa.int32())]
    for j, (name, typ) in enumerate(_stat_types):
        col = stats[:, j]
        cols.append(pa.array(col.astype(np.int64) if name in INT_FIELDS else col, type=typ))
    return pa.Table.from_arrays(cols, schema=ACTIVATIONS_SCHEMA)


def _router_table(r: RouterData | None) -> pa.Table:
    if r is None:
        return ROUTER_SCHEMA.empty_table()
    L, P, k = r.selected.shape
    layer = np.repeat(np.arange(L, dtype=np.int16), P * k)
    pos = np.tile(np.repeat(r.positions.astype(np.int32), k), L)
    rank = np.tile(np.arange(k, dtype=np.int16), L * P)
    entropy = np.repeat(r.entropy.reshape(-1), k)
    return pa.Table.from_arrays([
        pa.array(layer), pa.array(pos), pa.array(rank), pa.array(r.selected.reshape(-1).astype(np.int32)),
        pa.array(r.weights.reshape(-1).astype(np.float32)), pa.array(entropy.astype(np.float64)),
    ], schema=ROUTER_SCHEMA)


def _list_array(rows: np.ndarray) -> pa.Array:
    """float32 (n, d) -> list<float32> with n rows of d values."""
    n, d = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1)))


def _router_probs_table(r: RouterData) -> pa.Table:
    L, P, E = r.probs.shape
    return pa.Table.from_arrays([
        pa.array(np.repeat(np.arange(L, dtype=np.int16), P)), pa.array(np.tile(r.positions.astype(np.int32), L)),
        _list_array(r.probs.reshape(L * P, E)),
    ], schema=ROUTER_PROBS_SCHEMA)


def _logits_table(lg: LogitsData) -> pa.Table:
    m, K = lg.ids.shape
    return pa.Table.from_arrays([
        pa.array(np.repeat(lg.positions.astype(np.int32), K)), pa.array(np.tile(np.arange(K, dtype=np.int16), m)),
        pa.array(lg.ids.reshape(-1).astype(np.int32)), pa.array(lg.logits.reshape(-1).astype(np.float32)),
        pa.array(lg.probs.reshape(-1).astype(np.float32)),
        pa.array([t for row in lg.texts for t in row], type=pa.string()),
    ], schema=LOGITS_SCHEMA)


def _vectors_table(vectors: dict, n_layers: int) -> pa.Table:
    parts = []
    for key in _ordered(vectors, n_layers):
        pos, v = vectors[key]
        n = len(pos)
        parts.append(pa.Table.from_arrays([
            _layer_array(np.full(n, -1 if key[0] is None else key[0])), pa.array([key[1]] * n, type=pa.string()),
            pa.array(np.asarray(pos, dtype=np.int32)), _list_array(v),
        ], schema=VECTORS_SCHEMA))
    return pa.concat_tables(parts)


def _check_schema(name: str, table: pa.Table) -> None:
    want = TABLES[name]
    got = table.schema
    if [f.name for f in got] != [f.name for f in want] or any(
            not got.field(f.name).type.equals(f.type) for f in want):
        raise StoreError(f"{name}.parquet has columns {got.names} of types "
                         f"{[str(f.type) for f in got]}, expected {want.names}")


def _groups(keys: np.ndarray):
    """Row indices grouped by an int64 key, each group in row order."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cuts = np.flatnonzero(np.diff(sk)) + 1
    return np.split(order, cuts)


def _layers(col: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(col, -1).to_numpy().astype(np.int64)


def _slot_keys(layer: np.ndarray, slot: pa.ChunkedArray):
    names = slot.to_pylist()
    uniq = sorted(set(names))
    code = {s: i for i, s in enumerate(uniq)}
    codes = np.array([code[s] for s in names], dtype=np.int64)
    return (layer + 1) * len(uniq) + codes, uniq


def _read_activations(t: pa.Table) -> dict:
    layer = _layers(t.column("layer"))
    keys, uniq = _slot_keys(layer, t.column("slot"))
    pos = t.column("position").to_numpy().astype(np.int32)
    stats = np.stack([t.column(name).to_numpy().astype(np.float64) for name in STAT_FIELDS], axis=1)
    out = {}
    for idx in _groups(keys):
        i = idx[0]
        key = (None if layer[i] < 0 else int(layer[i]), uniq[int(keys[i] % len(uniq))])
        out[key] = SlotStats(pos[idx], stats[idx])
    return out


def _read_router(t: pa.Table, probs_table: pa.Table | None) -> RouterData | None:
    if t.num_rows == 0:
        return None
    layer = t.column("layer").to_numpy().astype(np.int64)
    pos = t.column("position").to_numpy().astype(np.int32)
    L = int(layer.max()) + 1
    positions = np.unique(pos)
    P = len(positions)
    k = t.num_rows // (L * P)
    if k * L * P != t.num_rows:
        raise StoreError("router.parquet does not hold the same k experts at every layer and position")
    order = np.lexsort((t.column("rank").to_numpy(), pos, layer))
    sel = t.column("expert").to_numpy()[order].astype(np.int32).reshape(L, P, k)
    w = t.column("weight").to_numpy()[order].astype(np.float32).reshape(L, P, k)
    ent = t.column("entropy").to_numpy()[order].reshape(L, P, k)[:, :, 0].astype(np.float64)
    probs = None
    if probs_table is not None and probs_table.num_rows:
        pl = probs_table.column("layer").to_numpy().astype(np.int64)
        pp = probs_table.column("position").to_numpy()
        o = np.lexsort((pp, pl))
        values = probs_table.column("probs").combine_chunks()
        flat = values.flatten().to_numpy().astype(np.float32)
        probs = flat.reshape(probs_table.num_rows, -1)[o].reshape(L, P, -1)
    return RouterData(positions=positions, selected=sel, weights=w, entropy=ent, probs=probs)


def _read_logits(t: pa.Table) -> LogitsData:
    pos = t.column("position").to_numpy().astype(np.int32)
    positions = np.unique(pos)
    m = len(positions)
    K = t.num_rows // max(m, 1)
    order = np.lexsort((t.column("rank").to_numpy(), pos))
    texts = np.array(t.column("text").to_pylist(), dtype=object)[order].reshape(m, K)
    return LogitsData(
        positions=positions, ids=t.column("token_id").to_numpy()[order].astype(np.int64).reshape(m, K),
        logits=t.column("logit").to_numpy()[order].astype(np.float32).reshape(m, K),
        probs=t.column("prob").to_numpy()[order].astype(np.float32).reshape(m, K),
        texts=[list(row) for row in texts],
    )


def _read_vectors(t: pa.Table) -> dict:
    layer = _layers(t.column("layer"))
    keys, uniq = _slot_keys(layer, t.column("slot"))
    pos = t.column("position").to_numpy().astype(np.int32)
    values = t.column("values").combine_chunks()
    offsets = values.offsets.to_numpy()
    flat = values.flatten().to_numpy().astype(np.float32)
    out = {}
    for idx in _groups(keys):
        i = idx[0]
        key = (None if layer[i] < 0 else int(layer[i]), uniq[int(keys[i] % len(uniq))])
        lengths = offsets[idx + 1] - offsets[idx]
        if len(set(lengths.tolist())) != 1:
            raise StoreError(f"vectors.parquet: {key} rows differ in length")
        d = int(lengths[0])
        rows = np.stack([flat[offsets[j]:offsets[j] + d] for j in idx]) if len(idx) else np.zeros((0, d), np.float32)
        out[key] = (pos[idx], rows)
    return out


# ---------------------------------------------------------------------------------------------------
# the store


@dataclass
class RunSummary:
    """One line of `trace ls`. status: 'ok', or 'corrupt' with `error` saying why."""

    id: str
    status: str
    created: str | None = None
    label: str | None = None
    source: str | None = None
    model: str | None = None
    model_path: str | None = None
    n_tokens: int | None = None
    prompt: str | None = None
    knobs: dict = field(default_factory=dict)
    vectors: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: it will never finish the write
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _last_activity(path: Path) -> float:
    newest = path.lstat().st_mtime
    try:
        for child in path.iterdir():
            newest = max(newest, child.lstat().st_mtime)
    except OSError:
        pass
    return newest


def changed_knobs(knobs: dict) -> dict:
    from engine.config import Knobs

    default = Knobs().to_dict()
    return {k: v for k, v in (knobs or {}).items() if default.get(k, object()) != v}


class Store:
    """The folder of runs. Safe for several writers and readers at once (each run is one atomic rename)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._host = socket.gethostname().replace("/", "_")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- writing ----------------------------------------------------------------------------------
    def _tmp_name(self, run_id: str) -> str:
        return f"{TMP_PREFIX}{os.getpid()}.{run_id}.{self._host}"

    def save(self, run: Run) -> str:
        """Write `run` atomically; returns its new id (also set in run.meta['id'])."""
        self.root.mkdir(parents=True, exist_ok=True)
        tables = run.tables()  # build before touching the disk: a bad run writes nothing
        for _ in range(5):
            now = _utc_now()
            run_id = f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            tmp = self.root / self._tmp_name(run_id)
            try:
                tmp.mkdir()
                meta = dict(run.meta, id=run_id)
                files = {}
                for name, table in tables.items():
                    sink = pa.BufferOutputStream()
                    pq.write_table(table, sink, compression="zstd")
                    buf = sink.getvalue()
                    _write_bytes(tmp / f"{name}.parquet", buf)
                    files[f"{name}.parquet"] = {"bytes": buf.size, "rows": table.num_rows,
                                                "sha256": hashlib.sha256(buf).hexdigest()}
                meta["files"] = files
                _write_bytes(tmp / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False,
                                                          allow_nan=False).encode("utf-8"))
                _fsync_dir(tmp)
                final = self.root / run_id
                if final.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
                os.rename(tmp, final)
                _fsync_dir(self.root)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"could not write the run to {self.root}: {exc.strerror or exc}") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            run.meta.update(id=run_id)
            return run_id
        raise StoreError(f"could not find a free run id in {self.root}")

    def _write_meta(self, run_dir: Path, meta: dict) -> None:
        tmp = run_dir / f"{TMP_PREFIX}{os.getpid()}.meta.{self._host}"
        _write_bytes(tmp, json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        os.replace(tmp, run_dir / "meta.json")
        _fsync_dir(run_dir)

    def rename(self, run_id: str, label: str | None) -> None:
        """Set (or clear, with None) the label of a run."""
        run_dir = self._dir(self.resolve(run_id))
        meta = _read_meta(run_dir)
        meta["label"] = check_label(label)
        self._write_meta(run_dir, meta)

    def remove(self, run_id: str) -> str:
        """Delete a run (corrupt ones too); returns its id. It disappears from `list` at once (one rename)."""
        rid = self.resolve(run_id)
        run_dir = self._dir(rid)
        doomed = self.root / self._tmp_name(rid)
        try:
            os.rename(run_dir, doomed)
        except FileNotFoundError:
            raise StoreError(f"no run {rid} in {self.root}") from None
        shutil.rmtree(doomed, ignore_errors=True)
        return rid

    # -- reading ----------------------------------------------------------------------------------
    def _dir(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise StoreError(f"{run_id!r} is not a run id")
        return self.root / run_id

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if RUN_ID_RE.match(p.name) and p.is_dir())

    def resolve(self, ref: str) -> str:
        """A run id from an id, a unique id prefix, or a unique label."""
        ids = self._ids()
        if ref in ids:
            return ref
        matches = [i for i in ids if ref and i.startswith(ref)]
        if not matches:
            for i in ids:
                try:
                    if _read_meta(self.root / i).get("label") == ref:
                        matches.append(i)
                except StoreError:
                    continue
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise StoreError(f"{ref!r} matches {len(matches)} runs ({', '.join(matches[:5])}); give more of the id")
        raise StoreError(f"no run {ref!r} in {self.root}")

    def load(self, run_id: str, *, vectors: bool = True) -> Run:
        """Read a run, checking every table's sha256 against meta.json first."""
        rid = self.resolve(run_id)
        run_dir = self._dir(rid)
        meta = _read_meta(run_dir)
        files = meta.pop("files")
        tables = {}
        for fname, info in files.items():
            name = fname.removesuffix(".parquet")
            if name not in TABLES or (name == "vectors" and not vectors):
                continue
            path = run_dir / fname
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StoreError(f"run {rid} is corrupt: {fname} is missing") from None
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise StoreError(f"run {rid} is corrupt: {fname} does not match its checksum")
            try:
                tables[name] = pq.read_table(pa.BufferReader(data))
            except (pa.ArrowException, OSError) as exc:
                raise StoreError(f"run {rid} is corrupt: {fname}: {exc}") from None
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise StoreError(f"run {rid} is corrupt: no {', '.join(missing)} table")
        return Run.from_tables(meta, tables)

    def check(self, run_id: str, *, verify: bool = False) -> dict:
        """meta.json of a run after cheap checks (files present, sizes, Parquet footers, row counts);
        verify=True also checks every sha256. Raises StoreError saying what is wrong."""
        run_dir = self._dir(run_id)
        meta = _read_meta(run_dir)
        files = meta.get("files") or {}
        for t in REQUIRED_TABLES:
            if f"{t}.parquet" not in files:
                raise StoreError(f"meta.json lists no {t}.parquet")
        for fname, info in files.items():
            path = run_dir / fname
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise StoreError(f"{fname} is missing") from None
            if size != info.get("bytes"):
                raise StoreError(f"{fname} has {size} bytes, meta.json says {info.get('bytes')}")
            try:
                footer = pq.read_metadata(path)
            except (pa.ArrowException, OSError) as exc:
                raise StoreError(f"{fname} is not a readable Parquet file ({exc})") from None
            if footer.num_rows != info.get("rows"):
                raise StoreError(f"{fname} has {footer.num_rows} rows, meta.json says {info.get('rows')}")
            if verify and hashlib.sha256(path.read_bytes()).hexdigest() != info.get("sha256"):
                raise StoreError(f"{fname} does not match its checksum")
        return meta

    def list(self, *, verify: bool = False) -> list[RunSummary]:
        """Every complete run, newest first; damaged ones flagged 'corrupt'. Cleans abandoned temporary folders."""
        self.clean()
        out = []
        for rid in self._ids():
            try:
                meta = self.check(rid, verify=verify)
            except StoreError as exc:
                created = None
                try:
                    created = datetime.fromtimestamp((self.root / rid).stat().st_mtime, timezone.utc).isoformat(
                        timespec="seconds").replace("+00:00", "Z")
                except OSError:
                    continue  # removed while we listed
                out.append(RunSummary(id=rid, status="corrupt", created=created, error=str(exc)))
                continue
            model = meta.get("model") or {}
            out.append(RunSummary(
                id=rid, status="ok", created=meta.get("created"), label=meta.get("label"), source=meta.get("source"),
                model=model.get("name"), model_path=model.get("path"), n_tokens=len(meta.get("tokens") or []),
                prompt=meta.get("prompt"), knobs=changed_knobs(meta.get("knobs")),
                vectors=bool((meta.get("captured") or {}).get("vectors")),
            ))
        out.sort(key=lambda s: (s.created or "", s.id), reverse=True)
        return out

    def clean(self) -> list[str]:
        """Remove temporary folders (and meta.json rewrites) whose writer is gone; returns their names."""
        if not self.root.is_dir():
            return []
        removed = []
        candidates = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for rid in self._ids():
            try:
                candidates += [p for p in (self.root / rid).iterdir() if p.name.startswith(TMP_PREFIX)]
            except OSError:
                continue
        for p in candidates:
            if not self._abandoned(p):
                continue
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                continue
            except OSError:
                continue
        return removed

    def _abandoned(self, p: Path) -> bool:
        parts = p.name[len(TMP_PREFIX):].split(".", 2)
        try:
            age = time.time() - _last_activity(p)
        except FileNotFoundError:
            return False
        if len(parts) == 3 and parts[0].isdigit() and parts[2] == self._host:
            return not _pid_alive(int(parts[0]))
        return age > STALE_SECONDS  # another host's writer, or a name we did not write: go by age


def _read_meta(run_dir: Path) -> dict:
    try:
        text = (run_dir / "meta.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError("meta.json is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"meta.json is unreadable ({exc})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"meta.json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "config" not in meta or "tokens" not in meta:
        raise StoreError("meta.json is not a run's metadata")
    version = meta.get("schema_version")
    if version != STORE_SCHEMA_VERSION:
        raise StoreError(f"meta.json has store schema version {version!r}; this workbench reads "
                         f"{STORE_SCHEMA_VERSION}")
    return meta
