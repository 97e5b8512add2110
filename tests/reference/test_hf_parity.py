"""Our engine against Hugging Face `Qwen3MoeForCausalLM` (torch CPU, float32, eager) built from the
same generated GGUF file's tensors, dequantized by gguf-py. Neither reference was written here.

Bars (issue "engine"): last-position logits within 1e-3 of the largest logit, top-10 ids identical,
every layer's output hidden state cosine >= 0.99999 at every position, selected experts identical at
every layer and position (ties aside).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the reference extra (torch, transformers) is part of .[dev]")
pytest.importorskip("transformers")

from engine.model import load_model  # noqa: E402
from engine.recorder import LAYER_SLOTS  # noqa: E402
from traces.reference import build_hf_model, run_reference  # noqa: E402
from traces.tracing import trace_tokens  # noqa: E402

pytestmark = pytest.mark.reference

PROMPT = [1, 200, 33, 47, 5, 90, 310, 12, 77, 150, 8, 402]
FILES = {
    "F32": {},
    "F16": {"qtype": "F16"},
    "BF16": {"qtype": "BF16"},
    "Q8_0": {"qtype": "Q8_0"},
    "Q4_K": {"qtype": "Q4_K"},
    "Q5_K": {"qtype": "Q5_K"},
    "Q6_K": {"qtype": "Q6_K"},
    "Q4_K_M": {"qtype": "Q4_K_M"},
    "no-rope-key": {"qtype": "Q8_0", "rope_theta": None},
    "head_dim-128": {"qtype": "Q4_K_M", "head_dim": 128, "n_heads": 4, "n_kv_heads": 1},
    "16-experts-4-used": {"qtype": "Q6_K", "n_experts": 16, "n_experts_used": 4, "n_layers": 3},
    "tied": {"qtype": "Q8_0", "tie_embeddings": True},
}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("name", list(FILES))
def test_engine_matches_hugging_face(model_factory, name):
    model = load_model(model_factory(**FILES[name]))
    ours = trace_tokens(model, PROMPT, capture_vectors=True)
    ref = run_reference(build_hf_model(model), PROMPT)

    # every slot of every layer, every position: cosine >= 0.99999
    worst = 1.0
    for layer in range(model.config.n_layers):
        for slot in LAYER_SLOTS:
            cos = cosine_rows(ours.vectors(layer, slot), ref.slots[(layer, slot)])
            worst = min(worst, float(cos.min()))
            assert cos.min() >= 0.99999, f"layer {layer} {slot}: cosine {cos.min():.7f}"
    for slot in ("embedding", "final_norm"):
        assert cosine_rows(ours.vectors(None, slot), ref.slots[(None, slot)]).min() >= 0.99999

    # selected experts identical at every layer and position, ties aside
    k = model.config.n_experts_used
    for layer in range(model.config.n_layers):
        mine = ours.router_array(layer, "selected_experts")
        theirs = ref.selected_experts[layer]
        probs = ours.router_array(layer, "routing_weights")
        srt = -np.sort(-probs, axis=1)
        for pos in range(len(PROMPT)):
            if srt[pos, k - 1] - srt[pos, k] < 1e-6:
                continue  # a tie at the k-th place: either choice is right
            assert set(mine[pos]) == set(theirs[pos]), f"layer {layer} position {pos}: {mine[pos]} vs {theirs[pos]}"
        assert np.allclose(ours.router_array(layer, "router_logits"), ref.router_logits[layer], atol=1e-4, rtol=1e-4)

    # last-position logits: within 1e-3 of the largest logit, top-10 identical
    lr = ours.logits_records[-1]
    hf_last = ref.logits[-1]
    mine_last = np.empty_like(hf_last)
    rec_all = trace_tokens(model, PROMPT, top_k=model.config.vocab_size)
    full = rec_all.logits_records[-1]
    mine_last[full.top_ids] = full.top_logits
    scale = np.abs(hf_last).max()
    assert np.abs(mine_last - hf_last).max() <= 1e-3 * scale
    assert list(lr.top_ids[:10]) == list(np.argsort(-hf_last, kind="stable")[:10])
    print(f"{name}: worst slot cosine {worst:.8f}, max logit diff / max |logit| "
          f"{np.abs(mine_last - hf_last).max() / scale:.2e}")


@pytest.mark.parametrize("name", ["stdlib-coder-q8_0.gguf", "stdlib-coder-q4_k_m.gguf"])
def test_embedded_model_matches_hugging_face(name):
    """The trained embedded model, same bars, on a real Python prompt through its own tokenizer."""
    from workbench.catalog import EMBEDDED_DIR

    model = load_model(EMBEDDED_DIR / name)
    tokens = model.tokenizer.encode("import os\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n")
    ours = trace_tokens(model, tokens, capture_vectors=True, top_k=model.config.vocab_size)
    ref = run_reference(build_hf_model(model), tokens)
    for layer in range(model.config.n_layers):
        for slot in LAYER_SLOTS:
            assert cosine_rows(ours.vectors(layer, slot), ref.slots[(layer, slot)]).min() >= 0.99999, (layer, slot)
        probs = ours.router_array(layer, "routing_weights")
        srt = -np.sort(-probs, axis=1)
        k = model.config.n_experts_used
        for pos in range(len(tokens)):
            if srt[pos, k - 1] - srt[pos, k] >= 1e-6:
                assert set(ours.router_array(layer, "selected_experts")[pos]) == set(ref.selected_experts[layer][pos])
    full = ours.logits_records[-1]
    mine = np.empty_like(ref.logits[-1])
    mine[full.top_ids] = full.top_logits
    assert np.abs(mine - ref.logits[-1]).max() <= 1e-3 * np.abs(ref.logits[-1]).max()
    assert list(full.top_ids[:10]) == list(np.argsort(-ref.logits[-1], kind="stable")[:10])
