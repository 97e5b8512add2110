"""The sampler, in the upstream order: repetition penalty, temperature, top_k, top_p, min_p, draw.

1. repetition penalty over the last `repeat_last_n` tokens of the history, each distinct token once:
   a positive logit is divided by the penalty, a negative one multiplied (1.0 or a window of 0: off;
   a window of -1: the whole history).
2. temperature: logits / T. Greedy instead (argmax of the penalised logits, nothing drawn) when
   T == 0 or top_k == 1.
3. top_k: the k best tokens (0: off).
4. top_p: the smallest best-first set whose probability reaches top_p (at least one token).
5. min_p: drop tokens whose probability is below min_p × the best one's.
6. draw from what is left with a numpy Generator (PCG64) seeded by `seed`: a seed reproduces a run.

Note: llama.cpp's default chain applies the temperature after min_p, so for T != 1 its top_k/top_p/min_p
see T = 1 probabilities; here (the upstream contract) they see the tempered ones.

When asked, a step returns a SamplingRecord: the best candidates and their count after each stage,
the parameters and the chosen token, so the app can show why a token was picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError, NonFiniteError, SamplingError

RECORD_TOP = 10  # candidates kept per stage in a SamplingRecord


def _number(name: str, value, kind: type):
    """`value` as a finite float or an integral int; bools, strings and None are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise SamplingError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """temperature >= 0 (0 = greedy); top_k >= 0 (0 = off, 1 = greedy); top_p in (0, 1] (1 = off);
    min_p in [0, 1] (0 = off); repeat_penalty > 0 (1 = off) over the last repeat_last_n tokens
    (0 = off, -1 = the whole history); seed >= 0 or None (fresh entropy); max_tokens >= 0;
    stop: strings that end generation when the generated text contains one.
    Numbers are stored as Python floats/ints; a bad value raises SamplingError naming the field."""

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
        def store(name, value):
            object.__setattr__(self, name, value)

        checks = {  # name: (type, lowest, low inclusive, highest, description of the range)
            "temperature": (float, 0.0, True, None, ">= 0"),
            "top_k": (int, 0, True, None, ">= 0 (0 turns it off)"),
            "top_p": (float, 0.0, False, 1.0, "in (0, 1]"),
            "min_p": (float, 0.0, True, 1.0, "in [0, 1]"),
            "repeat_penalty": (float, 0.0, False, None, "> 0 (1 turns it off)"),
            "repeat_last_n": (int, -1, True, None, ">= -1 (-1 = the whole history, 0 = off)"),
            "max_tokens": (int, 0, True, None, ">= 0"),
        }
        for name, (kind, low, inclusive, high, rule) in checks.items():
            value = _number(name, getattr(self, name), kind)
            if (value < low if inclusive else value <= low) or (high is not None and value > high):
                raise SamplingError(f"{name} must be {rule}, got {value}")
            store(name, value)
        if self.seed is not None:
            seed = _number("seed", self.seed, int)
            if seed < 0:
                raise SamplingError(f"seed must be >= 0 or None, got {seed}")
            store("seed", seed)
        stop = self.stop
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (tuple, list)):
            raise SamplingError(f"stop must be a list of strings, got {stop!r}")
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must hold non-empty strings, got {list(stop)!r}")
        store("stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Stage:
    """The candidates left after one stage: how many, and the best RECORD_TOP of them, best first."""

    name: str  # raw, repeat_penalty, temperature, top_k, top_p, min_p
    candidates: int
    top: list[tuple[int, float]]  # (token id, value)
    value: str  # what the values are: "logit" (raw, repeat_penalty, temperature) or "prob" (after)


@dataclass
class SamplingRecord:
    """Why one token was picked. chosen_prob: its probability in the distribution it was drawn from;
    when greedy, the softmax of the penalised logits (the model's own probability, T = 1)."""

    params: dict
    greedy: bool
    stages: list[Stage] = field(default_factory=list)
    chosen: int = -1
    chosen_prob: float = 0.0
    chosen_logit: float = 0.0  # its raw logit

    def to_dict(self) -> dict:
        """Plain JSON data: lists, not tuples; a non-finite value becomes None."""

        def plain(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(asdict(self))


def _best(values: np.ndarray, n: int = RECORD_TOP) -> np.ndarray:
    """Indices of the n largest finite values, best first, ties by lower index."""
    n = min(n, values.size)
    idx = np.argpartition(-values, n - 1)[:n] if n < values.size else np.arange(values.size)
    idx = np.sort(idx)
    idx = idx[np.argsort(-values[idx], kind="stable")]
    return idx[np.isfinite(values[idx])]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


class Sampler:
    """Picks the next token from a vector of logits; one per generation (its generator carries the seed)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
            raise SamplingError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Repetition penalty (stage 1): a new array when anything changes, else `logits` itself."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or len(history) == 0:
            return logits
        window = np.asarray(history if p.repeat_last_n == -1 else history[-p.repeat_last_n:], dtype=np.int64)
        bad = window[(window < 0) | (window >= self.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} in the history is out of range for a vocabulary of {self.vocab_size}")
        ids = np.unique(window)
        out = np.array(logits, dtype=np.float64)
        seen = out[ids]
        out[ids] = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int], record: bool = False
               ) -> tuple[int, SamplingRecord | None]:
        """logits: (vocab,) for the next position; history: the ids so far (prompt and generated).
        Returns (token id, SamplingRecord when `record`, else None).
        -inf logits are tokens that cannot be picked; NaN or +inf raise NonFiniteError."""
        p = self.params
        raw = np.asarray(logits)
        if raw.shape != (self.vocab_size,):
            raise SamplingError(f"logits have shape {raw.shape}, expected ({self.vocab_size},)")
        raw = raw.astype(np.float64)
        broken = np.isnan(raw) | np.isposinf(raw)
        if broken.any():
            raise NonFiniteError(f"logits contain NaN/Inf ({int(broken.sum())} of {raw.size}); refusing to sample")
        if not np.isfinite(raw).any():
            raise NonFiniteError("logits are all -inf; no token can be sampled")
        rec = SamplingRecord(params=asdict(p), greedy=p.greedy) if record else None

        def note(name, candidates, ids, values, kind):
            if rec is not None:
                top = [(int(i), float(v)) for i, v in zip(ids[:RECORD_TOP], values[:RECORD_TOP])]
                rec.stages.append(Stage(name, int(candidates), top, kind))

        def finish(token, prob):
            if rec is not None:
                rec.chosen, rec.chosen_prob, rec.chosen_logit = token, float(prob), float(raw[token])
            return token, rec

        n_finite = int(np.isfinite(raw).sum())
        if rec is not None:
            best = _best(raw)
            note("raw", n_finite, best, raw[best], "logit")
        # 1. repetition penalty
        x = self.penalize(raw, history)
        best = _best(x) if rec is not None else None
        if rec is not None:
            note("repeat_penalty", n_finite, best, x[best], "logit")
        # 2. greedy, or temperature (shifted by the max first, so that a tiny T cannot overflow)
        if p.greedy:
            token = int(np.argmax(x))
            return finish(token, _softmax(x)[token])
        z = (x - x.max()) / p.temperature  # (vocab,), best = 0
        if rec is not None:
            with np.errstate(over="ignore"):
                note("temperature", n_finite, best, x[best] / p.temperature, "logit")
        # 3. top_k: candidate ids, best first (ties by lower id); -inf tokens are never candidates
        k = p.top_k if 0 < p.top_k < n_finite else n_finite
        ids = _best(z, k)
        probs = _softmax(z[ids])
        note("top_k", ids.size, ids, probs, "prob")
        # 4. top_p: the smallest best-first prefix reaching top_p
        if p.top_p < 1.0:
            n = min(int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1, ids.size)
            ids, probs = ids[:n], probs[:n] / probs[:n].sum()
        note("top_p", ids.size, ids, probs, "prob")
        # 5. min_p: relative to the best candidate (probs[0]); a prefix, since probs are sorted
        if p.min_p > 0.0:
            n = max(1, int(np.count_nonzero(probs >= p.min_p * probs[0])))
            ids, probs = ids[:n], probs[:n] / probs[:n].sum()
        note("min_p", ids.size, ids, probs, "prob")
        # 6. draw: inverse CDF of one uniform number from the seeded generator
        j = min(int(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right")), ids.size - 1)
        return finish(int(ids[j]), probs[j])
