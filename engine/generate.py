"""Generation: prefill the prompt, then decode token by token from the KV cache, streaming.

`generate(...)` is a generator: it yields one `Step` per produced token as soon as it exists, and
closing it (or breaking out of the loop) stops the work. It stops by itself on a stop token
(EOS, <|im_end|>, <|endoftext|>), on a stop string, or after `max_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import Knobs
from .errors import NonFiniteError
from .forward import DEFAULT_KNOBS, forward
from .kv_cache import KVCache
from .model import Model
from .recorder import NULL_RECORDER, FirstNonFinite, Recorder
from .sampler import Sampler, SamplingParams
from .session import check_tokens


@dataclass
class Step:
    index: int  # 0 for the first generated token
    token_id: int
    text: str  # this token's text (may be part of a multi-byte character: see `Generation.text`)
    position: int  # its position in the sequence
    seconds: float  # wall time since generation started
    record: object | None = None  # engine.sampler.SamplingRecord when asked
    finish: str | None = None  # 'stop_token', 'stop_string', 'max_tokens' on the last step


@dataclass
class Generation:
    """What a finished (or closed) generation produced; filled in as steps are yielded."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.token_ids) if tokenizer is not None else ""


def first_non_finite(model: Model, tokens: Sequence[int], knobs: Knobs) -> str:
    """Re-run the sequence through the one forward with a recorder that finds the first NaN/Inf slot."""
    rec = FirstNonFinite()
    forward(model, np.asarray(tokens, dtype=np.int64), KVCache.for_model(model, len(tokens)), knobs=knobs, recorder=rec)
    return rec.describe()


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    knobs: Knobs = DEFAULT_KNOBS,
    recorder: Recorder = NULL_RECORDER,
    record_sampling: bool = False,
    result: Generation | None = None,
    stop_token_ids: set[int] | None = None,
) -> Iterator[Step]:
    """Yield generated tokens one at a time. `result`, when given, collects ids, timings and finish reason.

    stop_token_ids: the ids that end generation; default the tokenizer's (EOS, <|im_end|>, <|endoftext|>).
    """
    ids = check_tokens(model, prompt_ids)
    tok = model.tokenizer
    if stop_token_ids is None:
        stop_token_ids = set(tok.stop_token_ids) if tok is not None else set()
    stop_ids = set(stop_token_ids)
    sampler = Sampler(params, model.config.vocab_size)
    res = result if result is not None else Generation(prompt_ids=list(map(int, ids)))
    res.prompt_ids = list(map(int, ids))
    budget = min(params.max_tokens, model.config.context_length - len(ids))
    if budget <= 0:
        res.finish = "max_tokens"
        return
    cache = KVCache.for_model(model, capacity=len(ids) + budget)
    history = list(res.prompt_ids)
    t0 = time.perf_counter()
    logits = forward(model, ids, cache, knobs=knobs, recorder=recorder)[-1]
    res.prefill_seconds = time.perf_counter() - t0
    text_so_far = ""
    for index in range(budget):
        if not np.all(np.isfinite(logits)):
            raise NonFiniteError(f"generation stopped: the logits at position {cache.length - 1} contain NaN/Inf; "
                                 + first_non_finite(model, history, knobs))
        token, record = sampler.sample(logits, history, record=record_sampling)
        history.append(token)
        res.token_ids.append(token)
        piece = tok.token_text(token) if tok is not None else ""
        finish = None
        if token in stop_ids:
            finish = "stop_token"
        elif params.stop and tok is not None:
            text_so_far = tok.decode(res.token_ids)
            if any(s in text_so_far for s in params.stop):
                finish = "stop_string"
        if finish is None and index == budget - 1:
            finish = "max_tokens"
        res.decode_seconds = time.perf_counter() - t0 - res.prefill_seconds
        res.finish = finish
        yield Step(index=index, token_id=token, text=piece, position=cache.length, seconds=time.perf_counter() - t0,
                   record=record, finish=finish)
        if finish is not None:
            return
        logits = forward(model, np.array([token], dtype=np.int64), cache, knobs=knobs, recorder=recorder)[-1]
