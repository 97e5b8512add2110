"""The CUDA kernels (engine/kernels/cuda.py, through engine.cuda_backend) against the CPU kernels.

Runs under numba-cuda's simulator: tests/engine/test_cuda_sim.py starts it with NUMBA_ENABLE_CUDASIM=1
in a subprocess (the variable must be set before numba.cuda is first imported). Every kernel runs in
both launch geometries: SIMULATOR (what the simulated forward uses) and GPU (the shapes a real GPU
gets: 32 lanes per row, 4 rows and 8 tokens per block, 128 threads per row-wise block), on inputs
small enough for the simulator's one-Python-thread-per-CUDA-thread.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine import kernels as cpu
from engine.backend import CPU
from engine.model import QTensor
from test_kernels import random_weights

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run through tests/engine/test_cuda_sim.py"
sys.setswitchinterval(5e-4)  # the simulator's threads hand over at barriers: switch often

from engine.cuda_backend import CudaBackend  # noqa: E402  (after the simulator is chosen)
from engine.kernels import cuda as K  # noqa: E402

FAST_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
GEOMETRIES = {"simulator": K.SIMULATOR, "gpu": K.GPU}
ROWS = 10  # not a multiple of any geometry's rows per block
name = lambda q: q.name  # noqa: E731


def cols_for(qt) -> int:
    return 256 if qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 64


def tensor(qt, lead, rng) -> QTensor:
    cols = cols_for(qt)
    return QTensor(f"w_{qt.name}", int(qt), lead + (cols,), random_weights(qt, lead, cols, rng))


def assert_dots_close(got, want, x, w_deq):
    """got == want (the CPU kernel) within 1e-5 of each dot product's magnitude |x| . |w|."""
    mag = np.abs(x).astype(np.float64) @ np.abs(w_deq).astype(np.float64).T
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.all(err <= 1e-5 * mag + 1e-30), f"worst relative error {np.max(err / (mag + 1e-30)):.3g}"


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("qt", FAST_TYPES, ids=name)
def test_cuda_quant_kernels_match_cpu(qt, geometry):
    """matvec (n = 1), batched matmul over two token tiles, the expert-indexed kernel with one input per
    token (gate, up) and one per slot (down), and the embedding rows: each against the CPU kernel."""
    rng = np.random.default_rng(int(qt))
    be = CudaBackend(geometry=GEOMETRIES[geometry])
    cols = cols_for(qt)
    w = tensor(qt, (ROWS,), rng)
    we = tensor(qt, (3, ROWS), rng)
    be.upload([w, we])
    w_deq = cpu.dequantize_rows(qt, w.raw, cols)
    n_big = be.g.tok_tile + 1  # two tiles
    for n in (1, n_big):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        got = be.to_host(be.linear(w, be.from_host(x)))
        want = CPU.linear(w, x)
        assert_dots_close(got, want, x, w_deq)
    # experts: 4 tokens x 2 slots, expert 1 chosen 5 times (two tiles of pairs in the simulator), 2 never
    sel = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.int32)
    logits = np.where(np.arange(3)[None, :] == sel[:, :1], 2.0, np.where(np.arange(3)[None, :] == sel[:, 1:], 1.0, -9.0))
    _, dsel, _ = be.route(be.from_host(logits.astype(np.float32)), 2, True)
    assert np.array_equal(be.to_host(dsel), sel)
    xe = rng.standard_normal((4, cols)).astype(np.float32)
    xk = rng.standard_normal((4, 2, cols)).astype(np.float32)
    for x in (xe, xk):
        got = be.to_host(be.experts(we, dsel, be.from_host(x)))
        want = CPU.experts(we, sel, x)
        for t in range(4):
            for j in range(2):
                xr = x[t] if x.ndim == 2 else x[t, j]
                e_deq = cpu.dequantize_rows(qt, we.raw[sel[t, j]], cols)
                assert_dots_close(got[t, j][None], want[t, j][None], xr[None], e_deq)
    # embedding rows: gguf-py's values (the CPU's rows are bit-exact to gguf-py)
    ids = np.array([3, 0, ROWS - 1, 3], dtype=np.int64)
    got = be.to_host(be.embed(w, ids))
    np.testing.assert_allclose(got, w_deq[ids], rtol=1e-6, atol=1e-6 * np.abs(w_deq).max())


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_cuda_row_kernels_match_cpu(geometry):
    """rmsnorm (whole rows and per head), rope, KV write + causal GQA attention over a cache that
    already holds positions, router softmax/top-k/renormalise, swiglu, weighted sum, add: against the
    CPU backend on the same inputs."""
    rng = np.random.default_rng(7)
    be = CudaBackend(geometry=GEOMETRIES[geometry])
    n, heads, kvh, hd = 2, 2, 1, 16
    x = rng.standard_normal((n, 24)).astype(np.float32)
    wn = rng.standard_normal(24).astype(np.float32)
    whd = rng.standard_normal(hd).astype(np.float32)
    be.upload([], [wn, whd])
    close = dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(be.to_host(be.rmsnorm(be.from_host(x), wn, 1e-6)), CPU.rmsnorm(x, wn, 1e-6), **close)
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    np.testing.assert_allclose(be.to_host(be.rmsnorm(be.from_host(q), whd, 1e-6)), CPU.rmsnorm(q, whd, 1e-6), **close)
    positions = np.array([3, 4])
    got_q = be.rope(be.from_host(q), be.rope_tables(positions, hd, 1e6))
    want_q = CPU.rope(q, CPU.rope_tables(positions, hd, 1e6))
    np.testing.assert_allclose(be.to_host(got_q), want_q, **close)

    # attention: positions 0..2 already cached, the two new ones at 3, 4 (causal: 4 sees 0..4)
    class Cache:
        def __init__(self, b):
            self.k, self.v = b.cache_array((1, 6, kvh, hd)), b.cache_array((1, 6, kvh, hd))

    old_k = rng.standard_normal((3, kvh, hd)).astype(np.float32)
    old_v = rng.standard_normal((3, kvh, hd)).astype(np.float32)
    k = rng.standard_normal((n, kvh, hd)).astype(np.float32)
    v = rng.standard_normal((n, kvh, hd)).astype(np.float32)
    cc, gc = Cache(CPU), Cache(be)
    CPU.attend(cc, 0, np.zeros((3, heads, hd), np.float32), old_k, old_v, 0)
    be.attend(gc, 0, be.from_host(np.zeros((3, heads, hd), np.float32)), be.from_host(old_k), be.from_host(old_v), 0)
    want = CPU.attend(cc, 0, want_q, k, v, 3)
    got = be.attend(gc, 0, got_q, be.from_host(k), be.from_host(v), 3)
    np.testing.assert_allclose(be.to_host(got), want, **close)
    np.testing.assert_array_equal(be.to_host(gc.k)[:, :5], cc.k[:, :5])
    # router: ties go to the lower expert id, as the CPU's stable sort
    logits = np.array([[0.5, 2.0, 2.0, -1.0, 0.1], [3.0, -2.0, 0.0, 1.0, 1.0]], np.float32)
    for norm in (True, False):
        probs, sel, wts = be.route(be.from_host(logits), 3, norm)
        p_cpu, s_cpu, w_cpu = CPU.route(logits, 3, norm)
        np.testing.assert_allclose(be.to_host(probs), p_cpu, **close)
        assert np.array_equal(be.to_host(sel), s_cpu)
        np.testing.assert_allclose(be.to_host(wts), w_cpu, **close)
    gate = rng.standard_normal((n, 3, 8)).astype(np.float32) * 4
    up = rng.standard_normal((n, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(be.to_host(be.swiglu(be.from_host(gate), be.from_host(up))), CPU.swiglu(gate, up),
                               **close)
    down = rng.standard_normal((n, 3, 24)).astype(np.float32)
    got = be.weighted_sum(be.from_host(w_cpu), be.from_host(down))
    np.testing.assert_allclose(be.to_host(got), CPU.weighted_sum(w_cpu, down), **close)
    np.testing.assert_array_equal(be.to_host(be.add(be.from_host(x), be.from_host(x))), x + x)
    parts = [x[:, :5], x[:, 5:]]
    got = be.concat([be.from_host(p) for p in parts])
    np.testing.assert_array_equal(be.to_host(got), x)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_cuda_stats_are_reduced_on_the_device(geometry):
    """The ten STAT_FIELDS of each row, reduced on the device, equal activation_stats: NaN, Inf and
    zero counts exactly, the rest to float64 rounding; rows with one and with no finite value too."""
    be = CudaBackend(geometry=GEOMETRIES[geometry])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 37)).astype(np.float32)
    x[0, [1, 5]] = np.nan
    x[0, 7] = np.inf
    x[0, 9] = -np.inf
    x[1, :4] = 0.0
    x[2] = np.nan
    x[2, 3] = 2.5  # one finite value: std 0
    x[3] = np.inf  # none: NaN statistics
    got = be.stats(be.from_host(x))
    want = cpu.activation_stats(x)
    assert got.shape == want.shape == (4, len(cpu.STAT_FIELDS)) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert math.isnan(got[3, 1]) and got[3, 8] == 37
