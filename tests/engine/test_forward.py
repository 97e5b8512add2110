"""The one forward pass: knobs, tracing, KV cache. Real generated GGUF files, our real engine."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import DEFAULT_ROPE_THETA, Knobs
from engine.forward import forward
from engine.kv_cache import KVCache
from engine.model import load_model
from engine.recorder import LAYER_SLOTS
from traces.recorder import TraceRecorder
from traces.tracing import trace_tokens

STD = 2  # index of std_dev in STAT_FIELDS
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128]


def logits_of(model, tokens, knobs=Knobs(), recorder=None, all_logits=False):
    cache = KVCache(model.config, capacity=len(tokens))
    kwargs = {"recorder": recorder} if recorder is not None else {}
    return forward(model, np.array(tokens), cache, knobs=knobs, all_logits=all_logits, **kwargs)


def test_traced_equals_untraced_bit_identical(tiny_model):
    """Falsifier: a traced forward whose logits differ by even one bit from the untraced one."""
    plain = logits_of(tiny_model, PROMPT, all_logits=True)
    rec = TraceRecorder(capture_vectors=True, all_logits=True)
    traced = logits_of(tiny_model, PROMPT, recorder=rec, all_logits=True)
    assert plain.dtype == traced.dtype == np.float32
    assert np.array_equal(plain.view(np.uint32), traced.view(np.uint32))
    # and the recorder really saw every slot at every position
    for layer in range(tiny_model.config.n_layers):
        for slot in LAYER_SLOTS:
            assert rec.stats(layer, slot).shape == (len(PROMPT), 10)


def test_kv_cache_decode_equals_recompute(tiny_model):
    """Falsifier: cached token-by-token decode differing from a full recompute of the sequence."""
    model = tiny_model
    cache = KVCache(model.config, capacity=4)  # small on purpose: growth is exercised too
    seq = list(PROMPT)
    logits = forward(model, np.array(seq), cache)[-1]
    for _ in range(8):
        nxt = int(np.argmax(logits))
        full = logits_of(model, seq + [nxt])  # recompute everything from scratch
        seq.append(nxt)
        logits = forward(model, np.array([nxt]), cache)[-1]
        assert int(np.argmax(full[-1])) == int(np.argmax(logits))
        scale = np.max(np.abs(full[-1]))
        assert np.max(np.abs(full[-1] - logits)) <= 1e-4 * scale
    assert cache.length == len(seq)


def test_qk_norm_off_changes_attn_out_and_grows_std(tiny_model):
    """Turning off the per-head Q/K RMSNorm (the upstream bug) changes layer-0 attn_out and grows the std."""
    on = trace_tokens(tiny_model, PROMPT)
    off = trace_tokens(tiny_model, PROMPT, knobs=Knobs(qk_norm=False))
    # attn_norm and qkv precede the Q/K norm: identical; attn_out follows it: different
    assert np.array_equal(on.stats(0, "qkv"), off.stats(0, "qkv"))
    a_on, a_off = on.stats(0, "attn_out")[:, STD], off.stats(0, "attn_out")[:, STD]
    rel = np.abs(a_off - a_on) / a_on
    # position 0 attends only to itself: softmax over one key is 1 whatever the scores, so it is unchanged
    assert rel[0] < 1e-5
    assert rel[1:].max() > 0.05, f"layer-0 attn_out std changed by at most {rel[1:].max():.3%}"
    last = tiny_model.config.n_layers - 1
    growth_on = on.stats(last, "attn_out")[:, STD].mean() / on.stats(0, "attn_out")[:, STD].mean()
    growth_off = off.stats(last, "attn_out")[:, STD].mean() / off.stats(0, "attn_out")[:, STD].mean()
    print(f"attn_out std growth layer0->last: qk_norm on {growth_on:.3f}, off {growth_off:.3f}")
    out_on = on.stats(last, "output")[:, STD].mean()
    out_off = off.stats(last, "output")[:, STD].mean()
    print(f"last-layer output std: qk_norm on {out_on:.4f}, off {out_off:.4f} ({out_off / out_on:.2f}x)")
    assert out_off > out_on * 1.01, "without Q/K norm the layer-output std should grow"


def test_rope_default_is_one_million_when_key_absent(model_factory):
    """Falsifier: a file without qwen3moe.rope.freq_base read with any theta other than 1,000,000."""
    path = model_factory(rope_theta=None)
    model = load_model(path)
    assert model.config.rope_theta == DEFAULT_ROPE_THETA == 1_000_000.0
    assert model.config.sources["rope_theta"] == "default"
    assert "rope_theta" in model.config.defaults_used
    explicit = load_model(model_factory(rope_theta=1_000_000.0))
    assert explicit.config.sources["rope_theta"] == "file"
    # the same weights with the key present give the same logits: the default is the value the key would hold
    assert np.array_equal(logits_of(model, PROMPT), logits_of(explicit, PROMPT))


def test_rope_theta_knob_changes_attention_from_layer_0(tiny_model):
    upstream = trace_tokens(tiny_model, PROMPT, knobs=Knobs(rope_theta=10_000.0))
    right = trace_tokens(tiny_model, PROMPT)
    assert np.array_equal(upstream.stats(0, "qkv"), right.stats(0, "qkv"))
    assert not np.allclose(upstream.stats(0, "attn_out")[1:, STD], right.stats(0, "attn_out")[1:, STD], rtol=1e-4)


def test_norm_topk_prob_knob_changes_ffn_out(tiny_model):
    on = trace_tokens(tiny_model, PROMPT)
    off = trace_tokens(tiny_model, PROMPT, knobs=Knobs(norm_topk_prob=False))
    w_on = on.router_array(0, "expert_weights")
    w_off = off.router_array(0, "expert_weights")
    assert np.allclose(w_on.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(w_off.sum(axis=1) < 0.999)
    assert np.array_equal(on.router_array(0, "selected_experts"), off.router_array(0, "selected_experts"))
    assert not np.allclose(on.stats(0, "ffn_out"), off.stats(0, "ffn_out"))


def test_tied_embeddings_use_token_embd_as_lm_head(model_factory):
    model = load_model(model_factory(tie_embeddings=True))
    assert model.config.tie_embeddings
    assert model.output is model.token_embd
    out = logits_of(model, PROMPT)
    assert out.shape == (1, model.config.vocab_size) and np.all(np.isfinite(out))


def test_recorder_router_is_consistent(tiny_model):
    rec = trace_tokens(tiny_model, PROMPT)
    k = tiny_model.config.n_experts_used
    for layer in range(tiny_model.config.n_layers):
        probs = rec.router_array(layer, "routing_weights")
        sel = rec.router_array(layer, "selected_experts")
        assert probs.shape == (len(PROMPT), tiny_model.config.n_experts) and sel.shape == (len(PROMPT), k)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        # the selected experts are the k most probable ones, in descending order
        expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        assert np.array_equal(sel, expected)


@pytest.mark.parametrize("bad", [[-1], [10**9], []])
def test_bad_token_ids_are_refused(tiny_model, bad):
    from engine.errors import InputError

    with pytest.raises(InputError):
        trace_tokens(tiny_model, bad)


@pytest.mark.skipif(__import__("engine.kernels.cpu_q8", fromlist=["x"]).unavailable() is not None,
                    reason="8-bit activations need AVX2 and F16C")
def test_cpu_q8_backend_rounds_decode_steps_only_and_stays_close(model_factory):
    """cpu-q8 (8-bit inputs for single-token K-quant/Q8_0 products): a prompt (n > 1) gives the float32 logits
    bit for bit; decode steps differ by the input rounding only: cosine >= 0.999 (measured 0.99987) and the same argmax as
    the float32 path at every step; traced and untraced decode steps stay bit-identical."""
    path = model_factory(qtype="Q4_K_M")
    f32, q8 = load_model(path), load_model(path, backend="cpu-q8")
    assert q8.backend.name == "cpu-q8"
    prompt = np.array([1, 200, 33, 47, 5, 90])
    ca, cb = KVCache.for_model(f32, 16), KVCache.for_model(q8, 16)
    a, b = forward(f32, prompt, ca, all_logits=True), forward(q8, prompt, cb, all_logits=True)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    differs = False
    token = int(np.argmax(a[-1]))
    for _ in range(6):
        la, lb = forward(f32, np.array([token]), ca)[0], forward(q8, np.array([token]), cb)[0]
        cos = la.astype(np.float64) @ lb / (np.linalg.norm(la) * np.linalg.norm(lb))
        assert cos >= 0.999, cos
        assert np.argmax(la) == np.argmax(lb)
        differs |= not np.array_equal(la, lb)
        token = int(np.argmax(la))
    assert differs, "cpu-q8 gave the float32 logits: its kernels did not run"
    c1, c2 = KVCache.for_model(q8, 8), KVCache.for_model(q8, 8)
    forward(q8, prompt, c1)
    forward(q8, prompt, c2)
    plain = forward(q8, np.array([token]), c1)
    traced = forward(q8, np.array([token]), c2, recorder=TraceRecorder(top_k=5))
    assert np.array_equal(plain.view(np.uint32), traced[-1:].view(np.uint32))
