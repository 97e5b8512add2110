"""The sampler, in the upstream order: repetition penalty, temperature, top_k, top_p, min_p, draw.

Greedy (argmax after the penalty) when temperature is 0 or top_k is 1. The draw uses a numpy
Generator (PCG64) seeded by `seed`, so a seed reproduces a generation exactly. When asked, each
step returns a SamplingRecord: the top candidates after every stage and the chosen token, so the
app can show why a token was picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import NonFiniteError, SamplingError

RECORD_TOP = 10


def _number(name: str, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise SamplingError(f"{name} must be finite, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class SamplingParams:
    """temperature >= 0; top_k >= 0 (0 = off); top_p in (0, 1]; min_p in [0, 1]; repeat_penalty > 0
    (1.0 = off) over the last repeat_last_n tokens (0 = off, -1 = the whole context); max_tokens >= 0."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        t = _number("temperature", self.temperature)
        if t < 0:
            raise SamplingError(f"temperature must be >= 0, got {t}")
        if _number("top_k", self.top_k, int) < 0:
            raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        p = _number("top_p", self.top_p)
        if not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {p}")
        mp = _number("min_p", self.min_p)
        if not 0 <= mp <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {mp}")
        if _number("repeat_penalty", self.repeat_penalty) <= 0:
            raise SamplingError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if _number("repeat_last_n", self.repeat_last_n, int) < -1:
            raise SamplingError(f"repeat_last_n must be >= -1 (-1 = whole context), got {self.repeat_last_n}")
        if _number("max_tokens", self.max_tokens, int) < 0:
            raise SamplingError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.seed is not None:
            s = _number("seed", self.seed, int)
            if s < 0:
                raise SamplingError(f"seed must be >= 0, got {s}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop must be a sequence of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Stage:
    name: str
    candidates: int  # tokens still possible after this stage
    top: list[tuple[int, float]]  # (token id, logit or probability), best first


@dataclass
class SamplingRecord:
    params: dict
    stages: list[Stage] = field(default_factory=list)
    chosen: int = -1
    chosen_prob: float = float("nan")
    greedy: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _top(values: np.ndarray, mask: np.ndarray | None = None, n: int = RECORD_TOP) -> list[tuple[int, float]]:
    v = values if mask is None else np.where(mask, values, -np.inf)
    idx = np.argsort(-v, kind="stable")[:n]
    return [(int(i), float(values[i])) for i in idx if np.isfinite(v[i])]


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Repetition penalty over the last repeat_last_n tokens: positive logits divided, negative multiplied."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or not history:
            return logits
        window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        ids = np.unique(np.asarray(window, dtype=np.int64))
        out = logits.copy()
        vals = out[ids]
        out[ids] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int], record: bool = False):
        """-> (token id, SamplingRecord or None)."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float64)
        if not np.all(np.isfinite(logits)):
            raise NonFiniteError("logits contain NaN/Inf; refusing to sample")
        rec = SamplingRecord(params=asdict(p), greedy=p.greedy) if record else None
        if rec:
            rec.stages.append(Stage("raw", logits.size, _top(logits)))
        x = self.penalize(logits, history)
        if rec:
            rec.stages.append(Stage("repeat_penalty", x.size, _top(x)))
        if p.greedy:
            token = int(np.argmax(x))
            if rec:
                rec.chosen, rec.chosen_prob = token, 1.0
            return token, rec
        x = x / p.temperature
        keep = np.ones(x.size, dtype=bool)
        if rec:
            rec.stages.append(Stage("temperature", x.size, _top(x)))
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            keep &= x >= kth
            if keep.sum() > p.top_k:  # ties at the k-th value: keep the first k by id order of rank
                idx = np.argsort(-x, kind="stable")[: p.top_k]
                keep = np.zeros_like(keep)
                keep[idx] = True
        probs = self._softmax(x, keep)
        if rec:
            rec.stages.append(Stage("top_k", int(keep.sum()), _top(probs, keep)))
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            n_keep = min(cum.size, int(np.searchsorted(cum, p.top_p)) + 1)
            nucleus = np.zeros_like(keep)
            nucleus[order[:n_keep]] = True
            keep &= nucleus
            probs = self._softmax(x, keep)
        if rec:
            rec.stages.append(Stage("top_p", int(keep.sum()), _top(probs, keep)))
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs.max()
            probs = self._softmax(x, keep)
        if rec:
            rec.stages.append(Stage("min_p", int(keep.sum()), _top(probs, keep)))
        token = int(self.rng.choice(x.size, p=probs))
        if rec:
            rec.chosen, rec.chosen_prob = token, float(probs[token])
        return token, rec

    @staticmethod
    def _softmax(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
        z = np.where(keep, x, -np.inf)
        z = np.exp(z - z[keep].max())
        return z / z.sum()
