"""The embedded default model: committed, small, a real qwen3moe coder whose router specialises."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from engine.model import load_model
from traces.tracing import trace_tokens
from workbench import analysis
from workbench.catalog import DEFAULT_MODEL, EMBEDDED_DIR, available_models

FILES = ("stdlib-coder-q8_0.gguf", "stdlib-coder-q4_k_m.gguf")


@pytest.mark.parametrize("name", FILES)
def test_embedded_files_are_small_valid_qwen3moe_models(name):
    path = EMBEDDED_DIR / name
    assert path.stat().st_size <= 25 * 1024 * 1024
    m = load_model(path)
    c = m.config
    assert (c.hidden, c.n_layers, c.n_experts, c.n_experts_used) == (256, 4, 8, 2)
    assert c.rope_theta == 1_000_000.0 and c.sources["rope_theta"] == "file"
    assert m.tokenizer.vocab_size == 4096 and m.tokenizer.token_id("<|im_end|>") is not None
    assert "<|im_start|>" in m.chat_template


def test_the_default_model_is_selected_first():
    assert available_models()[0].path == (EMBEDDED_DIR / DEFAULT_MODEL).resolve()


def test_training_record_beats_the_unigram_baseline():
    record = json.loads((EMBEDDED_DIR / "training.json").read_text())
    assert record["validation_loss"] < record["unigram_baseline_loss"] - 1.0


def test_router_specialises_on_python_source():
    """Whitespace/indentation tokens and other tokens go to different experts; a random router would not care."""
    m = load_model(EMBEDDED_DIR / DEFAULT_MODEL)
    ids = m.tokenizer.encode(inspect.getsource(json.encoder)[:3000])[:400]
    rec = trace_tokens(m, ids)
    ws = np.array([m.tokenizer.token_text(t).strip() == "" for t in ids])
    E = m.config.n_experts
    distances = []
    for layer in range(m.config.n_layers):
        top1 = rec.router_array(layer, "selected_experts")[:, 0]
        pw = np.bincount(top1[ws], minlength=E) / ws.sum()
        po = np.bincount(top1[~ws], minlength=E) / (~ws).sum()
        distances.append(0.5 * np.abs(pw - po).sum())  # total variation distance
        counts = analysis.selection_counts(rec.router_array(layer, "selected_experts")[None], E)
        assert analysis.specialisation(counts)[0] > 0.05
    print("total variation, whitespace vs other tokens, per layer:", np.round(distances, 3))
    assert max(distances) > 0.5


def test_it_writes_python_looking_text():
    from engine.generate import Generation, generate
    from engine.sampler import SamplingParams

    m = load_model(EMBEDDED_DIR / DEFAULT_MODEL)
    prompt = m.tokenizer.encode("class Reader:\n    def __init__(self")
    res = Generation(prompt_ids=prompt)
    list(generate(m, prompt, SamplingParams(temperature=0.0, max_tokens=60), result=res))
    text = m.tokenizer.decode(res.token_ids)
    assert "self" in text and ":" in text and "\n    " in text, text
