"""The recorder interface the forward pass reports to.

There is one forward pass (engine/forward.py). Tracing is not a second forward: it is a recorder
passed into the one forward. The untraced path passes NULL_RECORDER, whose `enabled` is False, so
the forward skips the (cheap) statistics entirely; nothing the forward computes depends on the
recorder, which is why traced and untraced logits are bit-identical.

Slot names follow the upstream `apr trace` vocabulary:
    per layer: attn_norm, qkv, attn_out, ffn_norm, ffn_out, output
    per model: embedding, final_norm   (layer is None)

Shapes: n = positions processed in this call, d = the slot's width, E = experts, k = experts used.
"""

from __future__ import annotations

import numpy as np

# The statistics reduced per slot and position, in this order (the kernels' backend computes them)
STAT_FIELDS = ("count", "mean", "std_dev", "min", "max", "l2_norm", "abs_max", "nan_count", "inf_count",
               "zero_count")
LAYER_SLOTS = ("attn_norm", "qkv", "attn_out", "ffn_norm", "ffn_out", "output")
MODEL_SLOTS = ("embedding", "final_norm")


class Recorder:
    """Receives what the forward computes. Subclass and set `enabled = True` to trace."""

    enabled: bool = False
    capture_vectors: bool = False  # pass the hidden-state vectors, not only their statistics
    all_logits: bool = False  # ask the forward for logits at every position, not only the last

    def slot(self, layer: int | None, slot: str, positions: np.ndarray, stats: np.ndarray,
             vectors: np.ndarray | None) -> None:
        """stats: float64 (n, 10) in kernels.STAT_FIELDS order; vectors: float32 (n, d) when capture_vectors."""

    def router(self, layer: int, positions: np.ndarray, router_logits: np.ndarray, routing_weights: np.ndarray,
               selected_experts: np.ndarray, expert_weights: np.ndarray) -> None:
        """router_logits, routing_weights (softmax): float32 (n, E); selected_experts int (n, k), in
        descending probability; expert_weights float32 (n, k), renormalised when norm_topk_prob."""

    def logits(self, positions: np.ndarray, logits: np.ndarray) -> None:
        """logits: float32 (m, vocab) for the m positions the forward produced logits for."""


NULL_RECORDER = Recorder()


class FirstNonFinite(Recorder):
    """Finds where NaN/Inf first appear: the first (layer, slot, position, count) in forward order."""

    enabled = True

    def __init__(self):
        self.found: tuple | None = None

    def slot(self, layer, slot, positions, stats, vectors):
        if self.found is None:
            bad = stats[:, 7] + stats[:, 8]  # nan_count + inf_count
            hit = np.flatnonzero(bad > 0)
            if hit.size:
                self.found = (layer, slot, int(positions[hit[0]]), int(bad[hit[0]]))

    def describe(self) -> str:
        if self.found is None:
            return "no slot holds NaN/Inf; the logits alone are non-finite"
        layer, slot, pos, count = self.found
        where = f"layer {layer} {slot}" if layer is not None else slot
        return f"NaN/Inf first appear at {where} (position {pos}, {count} values)"
