"""The CUDA backend: the forward's steps (engine/backend.py's interface) as numba-cuda kernel launches.

Weights are copied to the GPU once, per tensor, as the raw GGUF blocks (engine/kernels/cuda.py reads
them in place). Activations, the KV cache and the routing stay on the device; the host receives the
logits the forward returns, the ten statistics of each traced slot (reduced on the device), and,
only when a recorder asks, captured vectors and the router's arrays.

`launches` counts kernel launches (trace bench reports launches per decoded token). Under numba-cuda's
simulator (NUMBA_ENABLE_CUDASIM=1) the same kernels run on the CPU in Python, with a smaller launch
geometry (kernels.cuda.SIMULATOR); that is how the tests run without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import numpy as np

from . import ops
from .backend import BackendUnavailable
from .errors import UnsupportedTypeError
from .quants import type_name


def _import_cuda():
    """numba.cuda, or BackendUnavailable naming what is missing."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise BackendUnavailable("the cuda backend needs numba-cuda, which is not installed "
                                 "(pip install 'moe-workbench[cuda]')")
    try:
        from numba import cuda
    except ImportError as exc:
        raise BackendUnavailable(f"the cuda backend needs numba-cuda, which failed to import: {exc}") from None
    return cuda


def simulator_active() -> bool:
    """True when numba-cuda runs its CPU simulator (NUMBA_ENABLE_CUDASIM=1) instead of a GPU."""
    from numba.cuda import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


class DeviceSelection:
    """selected_experts on the device: ids (n, k) int32, and the pairs p = t*k + j grouped by expert
    (starts (E + 1,), order (n*k,), active (E,), n_active (1,)) that the experts kernel reads."""

    def __init__(self, ids, starts, order, active, n_active):
        self.ids, self.starts, self.order, self.active, self.n_active = ids, starts, order, active, n_active

    @property
    def shape(self) -> tuple:
        return tuple(self.ids.shape)


class CudaBackend:
    """The forward's steps on one GPU (or the simulator), for one model whose weights it holds."""

    name = "cuda"

    def __init__(self, model=None, progress: Callable[[int, int], None] | None = None, geometry=None):
        cuda = _import_cuda()
        self.simulator = simulator_active()
        if not self.simulator and not cuda.is_available():
            raise BackendUnavailable("the cuda backend found no usable NVIDIA GPU "
                                     "(numba.cuda.is_available() is False: no CUDA driver or device)")
        from .kernels import cuda as K

        self.cuda = cuda
        self.K = K
        self.g = geometry or (K.SIMULATOR if self.simulator else K.GPU)
        self.rk = K.row_kernels(self.g)
        self.launches = 0
        self.device = "numba-cuda simulator" if self.simulator else cuda.get_current_device().name
        if isinstance(self.device, bytes):
            self.device = self.device.decode()
        self._dev: dict[int, object] = {}  # id(host tensor) -> device array
        self._types: dict[int, object] = {}  # id(QTensor) -> kernels.cuda.TypeKernels
        self._host: list = []  # the host tensors, kept alive so their ids stay theirs
        self.weight_bytes = 0
        if model is not None:
            qtensors = [model.token_embd, model.output]
            norms = [model.output_norm]
            for L in model.layers:
                qtensors += [L.attn_q, L.attn_k, L.attn_v, L.attn_output, L.ffn_gate_inp, L.ffn_gate_exps,
                             L.ffn_up_exps, L.ffn_down_exps]
                norms += [L.attn_norm, L.attn_q_norm, L.attn_k_norm, L.ffn_norm]
            self.upload(qtensors, norms, progress)

    # -- weights -------------------------------------------------------------------------------
    def upload(self, qtensors, norms=(), progress: Callable[[int, int], None] | None = None) -> None:
        """Copy weights to the device once: QTensors as their raw blocks, norm vectors as float32.
        Every type is checked before anything is copied."""
        unique = [t for t in {id(t): t for t in qtensors}.values() if id(t) not in self._dev]
        for t in unique:
            if t.qtype not in self.K.CUDA_TYPES:
                raise UnsupportedTypeError(f"tensor {t.name} has type {type_name(t.qtype)}, which the cuda backend "
                                           f"has no kernel for; run it with --backend cpu")
            tk = self.K.type_kernels(t.qtype, self.g)
            if t.shape[-1] % tk.cols_multiple:
                raise UnsupportedTypeError(f"tensor {t.name} has rows of {t.shape[-1]} elements; the cuda backend "
                                           f"reads {type_name(t.qtype)} rows in multiples of {tk.cols_multiple}")
            self._types[id(t)] = tk
        norms = [a for a in {id(a): a for a in norms}.values() if id(a) not in self._dev]
        total = sum(t.raw.nbytes for t in unique) + sum(a.nbytes for a in norms)
        done = 0
        for t in unique:
            raw = np.ascontiguousarray(t.raw)
            raw3 = raw.reshape((1,) + raw.shape) if raw.ndim == 2 else raw  # (E, R, row bytes), E = 1 for a matrix
            self._dev[id(t)] = self.cuda.to_device(raw3).view(self._types[id(t)].view)
            done += raw.nbytes
            if progress:
                progress(done, total)
        for a in norms:
            self._dev[id(a)] = self.cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))
        if progress:
            progress(total, total)
        self._host += unique + norms
        self.weight_bytes += total

    # -- launches ------------------------------------------------------------------------------
    def _launch(self, kernel, grid, block, *args) -> None:
        self.launches += 1
        kernel[grid, block](*args)

    def _elementwise(self, kernel, total: int, *args) -> None:
        et = self.g.elem_threads
        blocks = max(1, min(self.g.elem_blocks, (total + et - 1) // et))
        self._launch(kernel, blocks, et, *args)

    def _empty(self, shape, dtype=np.float32):
        return self.cuda.device_array(tuple(int(s) for s in shape), dtype=dtype)

    # -- host transfer and the KV cache's storage ----------------------------------------------
    def to_host(self, a) -> np.ndarray:
        if isinstance(a, DeviceSelection):
            return a.ids.copy_to_host()
        if isinstance(a, np.ndarray):
            return a
        return a.copy_to_host()

    def from_host(self, a: np.ndarray):
        return self.cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))

    def cache_array(self, shape: tuple):
        return self._empty(shape)

    def copy_positions(self, dst, src, length: int) -> None:
        if length:
            self._elementwise(self.rk.copy_positions, src.shape[0] * length * src.shape[2] * src.shape[3],
                              src, dst, length)

    # -- the forward's steps --------------------------------------------------------------------
    def embed(self, w, tokens: np.ndarray):
        n, cols = tokens.shape[0], w.shape[1]
        out = self._empty((n, cols))
        ids = self.cuda.to_device(np.ascontiguousarray(tokens, dtype=np.int64))
        self._launch(self._types[id(w)].rows, n, self.g.row_threads, self._dev[id(w)], ids, out)
        return out

    def rmsnorm(self, x, weight: np.ndarray, eps: float):
        d = tuple(x.shape)[-1]  # (the simulator's shapes take no negative index)
        x2 = x.reshape(int(np.prod(x.shape)) // d, d)
        out = self._empty(x2.shape)
        self._launch(self.rk.rmsnorm, x2.shape[0], self.g.row_threads, x2, self._dev[id(weight)], np.float32(eps), out)
        return out.reshape(x.shape)

    def linear(self, w, x):
        n, rows = x.shape[0], w.shape[0]
        out = self._empty((n, rows))
        g = self.g
        grid = ((rows + g.rows - 1) // g.rows, (n + g.tok_tile - 1) // g.tok_tile)
        self._launch(self._types[id(w)].matmul, grid, g.lanes * g.rows, self._dev[id(w)], x, out)
        return out

    def rope_tables(self, positions: np.ndarray, head_dim: int, theta: float):
        cos, sin = ops.rope_tables(positions, head_dim, theta)  # the CPU's tables, uploaded
        return self.cuda.to_device(cos), self.cuda.to_device(sin)

    def rope(self, x, tables):
        cos, sin = tables
        out = self._empty(x.shape)
        self._elementwise(self.rk.rope, x.shape[0] * x.shape[1] * (x.shape[2] // 2), x, cos, sin, out)
        return out

    def attend(self, cache, layer: int, q, k, v, p0: int):
        n, heads, hd = q.shape
        if hd > self.K.HD_MAX:
            raise UnsupportedTypeError(f"head_dim {hd} exceeds the cuda attention kernel's {self.K.HD_MAX}")
        self._elementwise(self.rk.kv_write, k.shape[0] * k.shape[1] * k.shape[2], k, v, cache.k, cache.v, layer, p0)
        out = self._empty(q.shape)
        self._launch(self.rk.attention, (n, heads), self.g.row_threads, q, cache.k, cache.v, layer, p0,
                     np.float32(1.0 / math.sqrt(hd)), out)
        return out

    def route(self, router_logits, k: int, norm_topk_prob: bool):
        n, E = router_logits.shape
        probs = self._empty((n, E))
        wts = self._empty((n, k))
        sel = DeviceSelection(self._empty((n, k), np.int32), self._empty((E + 1,), np.int32),
                              self._empty((n * k,), np.int32), self._empty((E,), np.int32),
                              self._empty((1,), np.int32))
        self._launch(self.rk.route, 1, self.g.row_threads, router_logits, k, bool(norm_topk_prob), probs, sel.ids,
                     wts, sel.starts, sel.order, sel.active, sel.n_active)
        return probs, sel, wts

    def experts(self, w, selected: DeviceSelection, x):
        n, k = selected.shape
        kx = 1 if len(x.shape) == 2 else x.shape[1]
        x2 = x.reshape(n * kx, tuple(x.shape)[-1])
        rows = w.shape[1]
        out = self._empty((n * k, rows))
        g = self.g
        grid = ((rows + g.rows - 1) // g.rows, min(w.shape[0], n * k))  # y: at most this many active experts
        self._launch(self._types[id(w)].experts, grid, g.lanes * g.rows, self._dev[id(w)], x2, k, kx,
                     selected.starts, selected.order, selected.active, selected.n_active, out)
        return out.reshape(n, k, rows)

    def swiglu(self, gate, up):
        out = self._empty(gate.shape)
        total = int(np.prod(gate.shape))
        self._elementwise(self.rk.swiglu, total, gate.reshape(total), up.reshape(total), out.reshape(total))
        return out

    def weighted_sum(self, weights, down):
        n, _, H = down.shape
        out = self._empty((n, H))
        self._elementwise(self.rk.weighted_sum, n * H, weights, down, out)
        return out

    def add(self, x, y):
        out = self._empty(x.shape)
        total = int(np.prod(x.shape))
        self._elementwise(self.rk.add, total, x.reshape(total), y.reshape(total), out.reshape(total))
        return out

    def concat(self, parts):
        n = parts[0].shape[0]
        out = self._empty((n, sum(p.shape[1] for p in parts)))
        c0 = 0
        for p in parts:
            self._elementwise(self.rk.copy_cols, n * p.shape[1], p, out, c0)
            c0 += p.shape[1]
        return out

    def last_rows(self, x, m: int):
        return x[x.shape[0] - m:]

    def stats(self, x) -> np.ndarray:
        out = self._empty((x.shape[0], 10), np.float64)
        self._launch(self.rk.stats, x.shape[0], self.g.row_threads, x, out)
        return out.copy_to_host()
