"""`trace reference` through the real command, then `trace diff` against the engine's run of the same tokens."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.reference


def run_id(proc):
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run ")
    return last.split()[1]


def test_trace_reference_then_diff_is_a_per_layer_bisection_with_no_divergence(cli, model_factory, tmp_path):
    model = model_factory(qtype="Q4_K")
    store = tmp_path / "store"
    args = ["--tokens", "5,17,42,99,3,250,7", "--store", store]
    engine = run_id(cli("run", model, *args, "--capture", "vectors", "--label", "engine"))
    ref = run_id(cli("reference", model, *args, "--label", "hf"))
    listed = json.loads(cli("ls", "--json", "--store", store).stdout)
    sources = {r.get("label"): r for r in listed}
    assert set(sources) >= {"engine", "hf"}
    out = cli("diff", engine, ref, "--json", "--store", store)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["first_divergence"] is None
    layer_rows = [r for r in d["layers"] if r["layer"] is not None and r["slot"] != "logits"]
    assert layer_rows and all(r["cosine_min"] >= 0.99999 for r in layer_rows if r["cosine_min"] is not None)
    assert sum(r["cosine_min"] is not None for r in layer_rows) >= 6 * 2  # six slots in each of two layers


def test_reference_with_a_wrong_rope_theta_diverges_at_layer_0_attention(cli, model_factory, tmp_path):
    model = model_factory(qtype="Q8_0")
    store = tmp_path / "store"
    args = ["--tokens", "5,17,42,99,3,250,7", "--store", store]
    engine = run_id(cli("run", model, *args, "--capture", "vectors"))
    ref = run_id(cli("reference", model, *args, "--rope-theta", "10000"))
    d = json.loads(cli("diff", engine, ref, "--json", "--store", store).stdout)
    assert d["first_divergence"]["layer"] == 0 and d["first_divergence"]["slot"] == "attn_out"
