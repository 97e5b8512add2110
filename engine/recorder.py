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
