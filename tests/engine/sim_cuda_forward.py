"""The one forward on the CUDA backend equals the one forward on the CPU: traces, cached decode, generation.

Runs under numba-cuda's simulator (tests/engine/test_cuda_sim.py starts it with NUMBA_ENABLE_CUDASIM=1
in a subprocess) on generated models small enough for it: 64 wide, 2 heads of 32 sharing one KV head,
4 experts of 32 with 2 used, a 64-token vocabulary.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from engine.config import Knobs
from engine.forward import forward
from engine.generate import generate
from engine.kernels import STAT_FIELDS
from engine.kv_cache import KVCache
from engine.model import load_model
from engine.recorder import LAYER_SLOTS
from engine.sampler import SamplingParams
from traces.lens import logit_lens
from traces.tracing import trace_tokens

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run through tests/engine/test_cuda_sim.py"
sys.setswitchinterval(5e-4)  # the simulator's threads hand over at barriers: switch often

SMALL = dict(hidden=64, n_heads=2, n_kv_heads=1, head_dim=32, n_experts=4, n_experts_used=2, moe_ff=32,
             vocab_size=64, tokenizer=None, chat_template=None)
PROMPT = [5, 17, 42, 3, 60]  # 5 positions: two token tiles of the simulator's matmul geometry
COUNTS = [STAT_FIELDS.index(f) for f in ("count", "nan_count", "inf_count", "zero_count")]


@pytest.fixture(scope="module")
def models(model_factory):
    """load(qtype, layers) -> the same generated file loaded on the CPU and on the CUDA backend."""
    loaded = {}

    def load(qtype: str, layers: int):
        if (qtype, layers) not in loaded:
            path = model_factory(qtype=qtype, n_layers=layers, **SMALL)
            loaded[qtype, layers] = load_model(path), load_model(path, backend="cuda")
        return loaded[qtype, layers]

    return load


@pytest.fixture(scope="module")
def pair(models):
    """The F32 model with 2 layers, on both backends."""
    return models("F32", 2)


@pytest.fixture(scope="module")
def small_pair(models):
    """The Q8_0 model with 1 layer, on both backends (the cheaper one to simulate)."""
    return models("Q8_0", 1)


def assert_stats_close(a: np.ndarray, b: np.ndarray, where: str):
    """Counts equal; every other field within 1e-4 relative to its magnitude, or to the row's RMS when
    that is larger (a mean near zero is a cancellation: its own magnitude says nothing)."""
    assert np.array_equal(a[:, COUNTS], b[:, COUNTS]), where
    rms = a[:, [STAT_FIELDS.index("l2_norm")]] / np.sqrt(a[:, [STAT_FIELDS.index("count")]])
    rel = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), np.nan_to_num(rms, nan=0.0))
    worst = float(np.nanmax(rel))
    assert worst <= 1e-4, f"{where}: stats differ by {worst:.3g} relative"


@pytest.mark.parametrize("qtype, layers, knobs", [
    ("F32", 2, Knobs()),
    ("Q8_0", 1, Knobs(qk_norm=False, rope_theta=10_000.0, norm_topk_prob=False)),
], ids=["F32-2layers", "Q8_0-1layer-upstream-bug-knobs"])
def test_cuda_trace_equals_cpu_trace(models, qtype, layers, knobs):
    """Falsifier: a CUDA trace whose top-10 logit ids differ at any position, whose selected experts
    differ, or any of whose slot statistics is further than 1e-4 relative from the CPU trace's."""
    cpu, gpu = models(qtype, layers)
    a = trace_tokens(cpu, PROMPT, knobs=knobs, capture_vectors={"output"})
    b = trace_tokens(gpu, PROMPT, knobs=knobs, capture_vectors={"output"})
    assert sorted(a._stats, key=str) == sorted(b._stats, key=str)
    assert len(a._stats) == 6 * cpu.config.n_layers + 2
    for layer, slot in a._stats:
        assert_stats_close(a.stats(layer, slot), b.stats(layer, slot), f"layer {layer} {slot}")
    assert len(a.logits_records) == len(b.logits_records) == len(PROMPT)
    for ra, rb in zip(a.logits_records, b.logits_records):
        assert ra.position == rb.position
        assert np.array_equal(ra.top_ids[:10], rb.top_ids[:10]), f"top-10 differ at position {ra.position}"
        np.testing.assert_allclose(rb.top_logits, ra.top_logits, rtol=1e-4, atol=1e-4 * np.abs(ra.top_logits).max())
        assert_stats_close(ra.stats[None], rb.stats[None], f"logits at {ra.position}")
    for layer in range(cpu.config.n_layers):
        assert np.array_equal(a.router_array(layer, "selected_experts"), b.router_array(layer, "selected_experts"))
        for name in ("router_logits", "routing_weights", "expert_weights"):
            np.testing.assert_allclose(b.router_array(layer, name), a.router_array(layer, name), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.vectors(layer, "output"), a.vectors(layer, "output"), rtol=1e-4, atol=1e-5)


def greedy(model, prompt, steps, capacity):
    cache = KVCache.for_model(model, capacity)
    logits = forward(model, np.array(prompt), cache)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits[-1])))
        logits = forward(model, np.array(out[-1:]), cache)
    return out, logits[-1], cache


def test_cuda_kv_cached_decode_equals_cpu_greedy(small_pair):
    """Falsifier: token-by-token decode from the device KV cache (grown twice from 2 positions) picking
    a different greedy token than the CPU, or its last logits further than 1e-4 of the largest."""
    cpu, gpu = small_pair
    want, want_last, _ = greedy(cpu, PROMPT[:3], 3, capacity=2)
    got, got_last, cache = greedy(gpu, PROMPT[:3], 3, capacity=2)
    assert got == want
    assert cache.length == 6 and cache.capacity >= 6
    assert np.max(np.abs(got_last - want_last)) <= 1e-4 * np.max(np.abs(want_last))


def test_cuda_generation_and_logit_lens_match_cpu(small_pair):
    """engine.generate and the logit lens run on the model's backend and agree with the CPU."""
    cpu, gpu = small_pair
    params = SamplingParams(temperature=0.0, max_tokens=3)
    assert [s.token_id for s in generate(gpu, PROMPT[:2], params)] == [s.token_id for s in generate(cpu, PROMPT[:2], params)]
    outputs = np.random.default_rng(0).standard_normal((cpu.config.n_layers, cpu.config.hidden)).astype(np.float32)
    rows_cpu, rows_gpu = logit_lens(cpu, outputs, 7), logit_lens(gpu, outputs, 7)
    assert [r.top_id for r in rows_gpu] == [r.top_id for r in rows_cpu]
    assert [r.answer_rank for r in rows_gpu] == [r.answer_rank for r in rows_cpu]


def test_cuda_launches_per_decoded_token(small_pair):
    """The launch count trace bench reports: 21 per layer and 3 around them for a decoded token, untraced."""
    _, gpu = small_pair
    cache = KVCache.for_model(gpu, 4)
    forward(gpu, np.array(PROMPT[:1]), cache)
    before = gpu.backend.launches
    forward(gpu, np.array([9]), cache)
    assert gpu.backend.launches - before == 21 * gpu.config.n_layers + 3


def test_cuda_model_refuses_a_cpu_kv_cache(small_pair):
    _, gpu = small_pair
    with pytest.raises(ValueError, match="KVCache.for_model"):
        forward(gpu, np.array([1]), KVCache(gpu.config, 4))


def test_recorded_slots_are_host_arrays(small_pair):
    """The recorder API is unchanged: it receives numpy arrays from either backend."""
    _, gpu = small_pair
    rec = trace_tokens(gpu, PROMPT[:1], capture_vectors=True)
    for layer in range(gpu.config.n_layers):
        for slot in LAYER_SLOTS:
            assert isinstance(rec.stats(layer, slot), np.ndarray) and isinstance(rec.vectors(layer, slot), np.ndarray)
        assert rec.router_array(layer, "selected_experts").dtype == np.int32
    # payloads and stored runs say which backend computed them
    from traces.payload import build_payload
    from traces.store import Run

    cpu, _ = small_pair
    assert build_payload(gpu, rec, PROMPT[:1], prompt=None, knobs=Knobs())["engine"]["backend"] == "cuda"
    assert Run.from_trace(gpu, rec, PROMPT[:1], prompt=None, knobs=Knobs()).meta["engine"]["backend"] == "cuda"
    cpu_rec = trace_tokens(cpu, PROMPT[:1])
    assert build_payload(cpu, cpu_rec, PROMPT[:1], prompt=None, knobs=Knobs())["engine"]["backend"] == "cpu"
