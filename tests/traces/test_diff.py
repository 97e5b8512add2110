"""trace diff: the first-divergence rule on real traces of generated models (knobs, quantizations, the
Hugging Face reference), alignment, router and logits comparisons, the JSON and text outputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from engine.config import Knobs
from engine.model import load_model
from traces.diff import DiffError, QUANTIZATION, diff_runs, kl_top_k
from traces.payload import build_payload
from traces.store import Run
from traces.tracing import trace_tokens

PROMPT = "def fizzbuzz(n):\n    for i in range(n):"


def make_run(model, tokens, vectors=True, **knobs):
    k = Knobs(**knobs)
    rec = trace_tokens(model, tokens, knobs=k, capture_vectors=vectors)
    return Run.from_trace(model, rec, tokens, prompt=None, knobs=k)


def without_vectors(run: Run) -> Run:
    out = copy.copy(run)
    out.vectors = {}
    return out


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def runs(tiny_model, tokens):
    return {"base": make_run(tiny_model, tokens), "no_qk_norm": make_run(tiny_model, tokens, qk_norm=False),
            "rope_10k": make_run(tiny_model, tokens, rope_theta=10_000.0)}


@pytest.fixture(scope="module")
def quantized(model_factory, tokens):
    q8 = load_model(model_factory(qtype="Q8_0"))
    q4 = load_model(model_factory(qtype="Q4_K_M"))
    return {"Q8_0": make_run(q8, tokens), "Q4_K_M": make_run(q4, tokens),
            "Q4_K_M no_qk_norm": make_run(q4, tokens, qk_norm=False)}


@pytest.mark.parametrize("vectors", [True, False], ids=["cosine", "std-only"])
def test_self_diff_has_no_divergence(runs, vectors):
    base = runs["base"] if vectors else without_vectors(runs["base"])
    d = diff_runs(base, base)
    out = d.to_json()
    assert out["first_divergence"] is None and out["verdict"] == "identical"
    assert {row["status"] for row in out["layers"]} == {"identical"}
    assert out["router"]["flips"] == 0
    assert out["logits"]["last"]["top_k_overlap"] == 1.0 and out["logits"]["max_kl"] == 0.0


@pytest.mark.parametrize("vectors", [True, False], ids=["cosine", "std-only"])
@pytest.mark.parametrize("knob", ["no_qk_norm", "rope_10k"])
def test_knob_diverges_at_layer_0_attention(runs, knob, vectors):
    """Q/K norm off, and rope theta 10,000 vs 1,000,000: everything before layer-0 attn_out is bit-identical."""
    a, b = runs["base"], runs[knob]
    if not vectors:
        a, b = without_vectors(a), without_vectors(b)
    d = diff_runs(a, b)
    out = d.to_json()
    assert out["first_divergence"]["layer"] == 0 and out["first_divergence"]["slot"] == "attn_out"
    assert out["first_divergence"]["metric"] == ("cosine" if vectors else "abs_log_std_ratio")
    assert out["band"]["name"] == "numerical" and out["verdict"] == "diverged"
    rows = out["layers"]
    assert [r["status"] for r in rows[:3]] == ["identical"] * 3  # embedding, attn_norm, qkv
    assert (rows[3]["layer"], rows[3]["slot"], rows[3]["status"]) == (0, "attn_out", "diverged")


def test_quantization_differences_are_bounded_and_called_quantization_level(quantized):
    d = diff_runs(quantized["Q8_0"], quantized["Q4_K_M"])
    out = d.to_json()
    assert out["band"]["name"] == "quantization"  # the files differ, by their fingerprints
    assert out["first_divergence"] is None and out["verdict"] == "quantization-level"
    assert "quantization-level" in out["message"]
    assert out["first_difference"] == {"layer": None, "slot": "embedding"}  # the weights differ from the start
    rows = [r for r in out["layers"] if r["positions"]]
    assert all(0 < r["median_abs_log_std_ratio"] <= QUANTIZATION.abs_log_std_ratio_max for r in rows)
    assert all(r["cosine_median"] >= QUANTIZATION.cosine_min for r in rows if r["cosine_median"] is not None)
    # the same comparison held to float rounding does diverge, at the very first slot: the band does the work
    strict = diff_runs(quantized["Q8_0"], quantized["Q4_K_M"], band="numerical").to_json()
    assert strict["first_divergence"]["slot"] == "embedding"
    std_only = diff_runs(without_vectors(quantized["Q8_0"]), without_vectors(quantized["Q4_K_M"]))
    assert std_only.first_divergence is None and std_only.verdict == "quantization-level"


@pytest.mark.parametrize("vectors", [True, False], ids=["cosine", "std-only"])
def test_qk_norm_off_is_found_across_quantizations(quantized, vectors):
    a, b = quantized["Q8_0"], quantized["Q4_K_M no_qk_norm"]
    if not vectors:
        a, b = without_vectors(a), without_vectors(b)
    fd = diff_runs(a, b).to_json()["first_divergence"]
    assert (fd["layer"], fd["slot"]) == (0, "attn_out")


def test_text_output_marks_the_first_divergence_row(runs):
    text = diff_runs(runs["base"], runs["no_qk_norm"]).to_text()
    marked = [line for line in text.splitlines() if "first divergence" in line and "verdict" not in line]
    assert len(marked) == 1 and marked[0].split()[:2] == ["0", "attn_out"]
    assert "verdict: diverged" in text
    assert "first divergence" not in diff_runs(runs["base"], runs["base"]).to_text()


def test_json_is_strict_json_with_the_documented_shape(runs):
    out = diff_runs(runs["base"], runs["rope_10k"]).to_json()
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert {"first_divergence", "layers", "router", "logits"} <= set(back)
    assert len(back["layers"]) == 6 * 2 + 3  # embedding, 6 slots x 2 layers, final_norm, logits
    row = back["layers"][3]
    for key in ("layer", "slot", "std_a", "std_b", "std_ratio", "mean_diff", "cosine_min", "status"):
        assert key in row
    assert {"layers", "first_flip", "flips"} <= set(back["router"])
    assert {"last", "max_kl", "positions"} <= set(back["logits"])


def test_different_tokens_need_an_alignment(tiny_model, runs, tokens):
    other = make_run(tiny_model, tokens[:-3] + [5, 6], vectors=False)
    with pytest.raises(DiffError, match="--align"):
        diff_runs(runs["base"], other)
    d = diff_runs(runs["base"], other, align="prefix")
    assert d.pairs == [(i, i) for i in range(len(tokens) - 3)]
    assert d.first_divergence is None  # a causal model: the common prefix computes the same
    d = diff_runs(runs["base"], other, align="last")
    assert d.pairs == [(len(tokens) - 1, len(tokens) - 2)]
    assert d.first_divergence is not None
    shifted = make_run(tiny_model, [7] + tokens[1:], vectors=False)
    with pytest.raises(DiffError, match="no common prefix"):
        diff_runs(runs["base"], shifted, align="prefix")


def test_payloads_diff_at_the_last_position(tiny_model, tokens):
    k = Knobs()
    rec = trace_tokens(tiny_model, tokens, knobs=k)
    base = Run.from_payload(build_payload(tiny_model, rec, tokens, prompt=None, knobs=k, top_k=10))
    k2 = Knobs(qk_norm=False)
    rec2 = trace_tokens(tiny_model, tokens, knobs=k2)
    off = Run.from_payload(build_payload(tiny_model, rec2, tokens, prompt=None, knobs=k2, top_k=10))
    assert diff_runs(base, base).first_divergence is None
    d = diff_runs(base, off)
    assert d.band.name == "numerical"  # same model path and size
    assert (d.first_divergence.layer, d.first_divergence.slot) == (0, "attn_out")
    assert all(r.positions in (0, 1) for r in d.rows)
    stored = Run.from_trace(tiny_model, rec, tokens, prompt=None, knobs=k)
    assert diff_runs(stored, off).first_divergence.slot == "attn_out"  # a run against a payload


def test_router_jaccard_and_flipped_positions(runs):
    a = runs["base"]
    b = copy.deepcopy(a)
    sel = b.router.selected
    E = a.meta["config"]["n_experts"]
    keep, drop = sel[1, 2]
    sel[1, 2, 1] = next(e for e in range(E) if e not in (keep, drop))
    r = diff_runs(a, b).to_json()["router"]
    assert r["flips"] == 1 and r["first_flip"] == {"layer": 1, "position": 2}
    assert r["layers"][1]["flipped_positions"] == [2] and r["layers"][0]["flipped_positions"] == []
    assert r["layers"][1]["min_jaccard"] == pytest.approx(1 / 3)  # {x, y} vs {x, z}


def test_nonfinite_counts_and_changes_of_scale_diverge(runs):
    a = runs["base"]
    b = copy.deepcopy(a)
    b.activations[(1, "ffn_out")].stats[-1, 7] = 3  # nan_count
    fd = diff_runs(a, b).first_divergence
    assert (fd.layer, fd.slot, fd.metric) == (1, "ffn_out", "nonfinite_count")
    c = copy.deepcopy(a)
    c.activations[(1, "attn_out")].stats[:, 2] *= 2.0  # std doubles ...
    pos, v = c.vectors[(1, "attn_out")]
    c.vectors[(1, "attn_out")] = (pos, v * 2.0)  # ... while every cosine stays 1
    fd = diff_runs(a, c).first_divergence
    assert (fd.layer, fd.slot, fd.metric) == (1, "attn_out", "abs_log_std_ratio")


def test_kl_from_top_k_is_a_lower_bound_exact_with_all_tokens():
    rng = np.random.default_rng(0)
    for _ in range(20):
        la, lb = rng.normal(size=50) * 2, rng.normal(size=50) * 2
        p, q = np.exp(la) / np.exp(la).sum(), np.exp(lb) / np.exp(lb).sum()
        full = float(np.sum(p * np.log(p / q)))
        ia, ib = np.argsort(-p), np.argsort(-q)
        assert kl_top_k(ia[:10], p[ia[:10]], ib[:10], q[ib[:10]]) <= full + 1e-12
        assert kl_top_k(ia, p[ia], ib, q[ib]) == pytest.approx(full, rel=1e-9)
    assert kl_top_k(np.arange(5), np.full(5, 0.2), np.arange(5), np.full(5, 0.2)) == 0.0


def test_engine_run_vs_reference_run_from_the_same_vectors_is_numerical(tiny_model, tokens, runs):
    """Run.from_reference stores what it is given; diff compares it slot by slot (no torch needed here)."""
    from engine.forward import forward
    from engine.kv_cache import KVCache
    from traces.reference import ReferenceOutput

    base = runs["base"]
    rec = trace_tokens(tiny_model, tokens, capture_vectors=True)
    L = tiny_model.config.n_layers
    logits = forward(tiny_model, np.array(tokens), KVCache(tiny_model.config, capacity=len(tokens)), all_logits=True)
    ref = ReferenceOutput(logits=logits, slots={k: rec.vectors(*k) * np.float32(1 + 1e-6) for k in rec.vector_keys},
                          router_logits=[rec.router_array(i, "router_logits") for i in range(L)],
                          selected_experts=[rec.router_array(i, "selected_experts") for i in range(L)],
                          expert_weights=[rec.router_array(i, "expert_weights") for i in range(L)])
    d = diff_runs(base, Run.from_reference(tiny_model, tokens, ref, prompt=None))
    assert d.first_divergence is None and d.verdict == "numerical"
    assert d.router["flips"] == 0


@pytest.mark.reference
def test_engine_vs_hugging_face_reference_has_no_divergence(model_factory, tokens):
    """Engine vs Qwen3MoeForCausalLM on a Q4_K fixture: every layer cosine >= 0.99999, no divergence."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from traces.reference import build_hf_model, run_reference

    model = load_model(model_factory(qtype="Q4_K"))
    ours = make_run(model, tokens)
    ref = Run.from_reference(model, tokens, run_reference(build_hf_model(model), tokens), prompt=None)
    out = diff_runs(ours, ref).to_json()
    assert out["band"]["name"] == "numerical"
    assert out["first_divergence"] is None, out["message"]
    for row in out["layers"]:
        if row["slot"] != "logits":
            assert row["cosine_min"] >= 0.99999, row
    assert out["logits"]["last"]["top1_same"]
