"""Tracing a prompt: the engine's one forward with a TraceRecorder, and the payload built from it."""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import Knobs
from engine.forward import forward
from engine.kv_cache import KVCache
from engine.model import Model
from engine.session import check_tokens

from .payload import build_payload
from .recorder import TraceRecorder


def trace_tokens(model: Model, tokens: Sequence[int], *, knobs: Knobs = Knobs(), capture_vectors: bool = False,
                 all_logits: bool = True, top_k: int = 20) -> TraceRecorder:
    """Run the prompt through the forward once, recording every slot at every position."""
    ids = check_tokens(model, tokens)
    rec = TraceRecorder(capture_vectors=capture_vectors, all_logits=all_logits, top_k=top_k)
    forward(model, ids, KVCache.for_model(model, capacity=len(ids)), knobs=knobs, recorder=rec)
    return rec


def trace_payload(model: Model, tokens: Sequence[int], *, prompt: str | None, knobs: Knobs = Knobs(),
                  top_k: int = 5) -> dict:
    rec = trace_tokens(model, tokens, knobs=knobs, top_k=max(top_k, 20))
    return build_payload(model, rec, tokens, prompt=prompt, knobs=knobs, top_k=top_k)
