"""The logit lens: the model's own final norm and lm_head applied to each layer's output.

It asks, layer by layer, "if the model stopped here, what would it say?" — the layer where the
final answer first reaches the top shows where the computation happens; a layer where everything
collapses to one garbage token shows where a bug bites. It reuses engine.forward's final_norm and
lm_head, so it cannot drift from the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.forward import final_norm, lm_head
from engine.model import Model


@dataclass
class LensRow:
    layer: int
    top_id: int
    top_prob: float
    answer_rank: int  # rank of the final top-1 token at this layer (0 = on top)
    answer_prob: float


def logit_lens(model: Model, outputs: np.ndarray, answer_id: int) -> list[LensRow]:
    """outputs: float32 (L, H), each layer's output at one position; answer_id: the final top-1 token."""
    be = model.backend
    logits = be.to_host(lm_head(model, final_norm(model, be.from_host(outputs))))  # (L, V)
    rows = []
    for layer, row in enumerate(logits.astype(np.float64)):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = int(np.argmax(row))
        rank = int((row > row[answer_id]).sum())
        rows.append(LensRow(layer, top, float(p[top]), rank, float(p[answer_id])))
    return rows
