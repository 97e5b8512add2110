"""TraceRecorder: the recorder the traces package passes into the engine's one forward pass.

It keeps, for every position the forward processes (across calls, so a generation's steps add up):
  stats[(layer, slot)]   float64 (P, 10)  per-position statistics (engine.kernels.STAT_FIELDS order);
                         layer is None for 'embedding' and 'final_norm'
  router[layer]          selected_experts int32 (P, k), expert_weights float32 (P, k),
                         router_logits / routing_weights float32 (P, E)
  logits                 per position that produced logits: stats (10,), l2_norm, top-k ids/logits/probs
  vectors[(layer, slot)] float32 (P, d) when capture_vectors
P = positions recorded so far, in order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from engine.recorder import Recorder


def top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' ids, largest first, ties by lower id (as a stable descending argsort, which
    would sort the whole 151,936-entry vocabulary every decode step)."""
    if k >= row.shape[0]:
        return np.argsort(-row, kind="stable")
    part = np.argpartition(-row, k - 1)[:k]
    kth = row[part].min()
    if not np.isfinite(kth):  # NaN or Inf at the boundary (a broken model): the plain stable sort
        return np.argsort(-row, kind="stable")[:k]
    # every id tied with the k-th value competes on its id, as in the stable sort
    cand = np.union1d(part[row[part] > kth], np.flatnonzero(row == kth))
    order = np.lexsort((cand, -row[cand]))
    return cand[order][:k]


@dataclass
class LogitsRecord:
    position: int
    stats: np.ndarray  # float64 (10,)
    top_ids: np.ndarray  # int64 (K,)
    top_logits: np.ndarray  # float32 (K,)
    top_probs: np.ndarray  # float32 (K,) softmax over the whole vocabulary


class TraceRecorder(Recorder):
    enabled = True

    def __init__(self, *, capture_vectors: bool | frozenset = False, all_logits: bool = False, top_k: int = 20,
                 keep_last_logits: bool = False, vectors_last_only: bool = False):
        """capture_vectors: True for every slot, or a set of slot names; vectors_last_only keeps only the
        last position of each call (what the logit lens needs, at 48 layers x 2048 floats)."""
        self.capture_vectors = bool(capture_vectors)
        self._capture_slots = None if capture_vectors is True else frozenset(capture_vectors or ())
        self.vectors_last_only = vectors_last_only
        self.all_logits = all_logits
        self.top_k = top_k
        self.keep_last_logits = keep_last_logits
        self._stats: dict = defaultdict(list)
        self._vectors: dict = defaultdict(list)
        self._router: dict = defaultdict(lambda: defaultdict(list))
        self.positions: list[int] = []
        self.logits_records: list[LogitsRecord] = []
        self.last_logits: np.ndarray | None = None

    # -- the engine calls these ------------------------------------------------------------------
    def slot(self, layer, slot, positions, stats, vectors):
        if layer is None and slot == "embedding":
            self.positions.extend(int(p) for p in positions)
        self._stats[(layer, slot)].append(np.asarray(stats, dtype=np.float64))
        if vectors is not None and (self._capture_slots is None or slot in self._capture_slots):
            keep = vectors[-1:] if self.vectors_last_only else vectors
            self._vectors[(layer, slot)].append(np.array(keep, dtype=np.float32))

    def router(self, layer, positions, router_logits, routing_weights, selected_experts, expert_weights):
        r = self._router[layer]
        r["router_logits"].append(np.array(router_logits, dtype=np.float32))
        r["routing_weights"].append(np.array(routing_weights, dtype=np.float32))
        r["selected_experts"].append(np.array(selected_experts, dtype=np.int32))
        r["expert_weights"].append(np.array(expert_weights, dtype=np.float32))

    def logits(self, positions, logits):
        from engine.kernels import activation_stats, softmax_parts  # here: `trace ls` and friends need no Numba

        k = min(self.top_k, logits.shape[-1])
        for pos, row in zip(positions, logits):
            top = top_ids(row, k)
            peak, denominator = softmax_parts(row)  # softmax over the whole row, evaluated at the top k only
            if np.isfinite(peak):
                with np.errstate(invalid="ignore"):
                    probs = (np.exp(row[top].astype(np.float64) - peak) / denominator).astype(np.float32)
            else:
                probs = np.full(top.shape, np.nan, np.float32)
            self.logits_records.append(
                LogitsRecord(int(pos), activation_stats(row), top.astype(np.int64), row[top].copy(), probs)
            )
        if self.keep_last_logits:
            self.last_logits = np.array(logits[-1], dtype=np.float32)

    # -- read back ---------------------------------------------------------------------------------
    def stats(self, layer: int | None, slot: str) -> np.ndarray:
        """float64 (P, 10) for every recorded position."""
        return np.concatenate(self._stats[(layer, slot)], axis=0)

    def has(self, layer, slot) -> bool:
        return (layer, slot) in self._stats

    def vectors(self, layer: int | None, slot: str) -> np.ndarray | None:
        parts = self._vectors.get((layer, slot))
        return np.concatenate(parts, axis=0) if parts else None

    def router_array(self, layer: int, name: str) -> np.ndarray:
        return np.concatenate(self._router[layer][name], axis=0)

    @property
    def router_layers(self) -> list[int]:
        return sorted(self._router)

    @property
    def vector_keys(self) -> list:
        return list(self._vectors)
