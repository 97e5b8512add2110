"""Key/value cache: keys and values of every past position, per layer, after Q/K norm and RoPE.

Shapes: k, v are float32 (n_layers, capacity, n_kv_heads, head_dim), held by the backend that runs
the model (numpy arrays on the CPU, device arrays on a GPU). `length` is the number of positions
already processed; the forward appends at `length` and advances it. Capacity grows by doubling
(bounded by the model's context length), so a long generation reallocates a few times.
"""

from __future__ import annotations

from .backend import CPU
from .config import ModelConfig
from .errors import InputError


class KVCache:
    def __init__(self, config: ModelConfig, capacity: int = 256, *, backend=CPU):
        self.backend = backend
        self.max_positions = config.context_length
        self._shape = (config.n_layers, config.n_kv_heads, config.head_dim)
        capacity = max(1, min(capacity, self.max_positions))
        L, kvh, hd = self._shape
        self.k = backend.cache_array((L, capacity, kvh, hd))
        self.v = backend.cache_array((L, capacity, kvh, hd))
        self.length = 0

    @classmethod
    def for_model(cls, model, capacity: int = 256) -> "KVCache":
        """A cache on the backend `model` runs on."""
        return cls(model.config, capacity, backend=model.backend)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more positions; InputError past the context length."""
        need = self.length + n_new
        if need > self.max_positions:
            raise InputError(
                f"{need} positions exceed the model's context length {self.max_positions}"
            )
        if need <= self.capacity:
            return
        cap = min(self.max_positions, max(need, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self.backend.cache_array((old.shape[0], cap) + tuple(old.shape[2:]))
            self.backend.copy_positions(new, old, self.length)
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (e.g. to re-run a prompt suffix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
