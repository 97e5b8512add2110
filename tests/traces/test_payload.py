"""`trace export`: the payload schema and the upstream regression gate, through the real command."""

from __future__ import annotations

import json
import math

import pytest

from contracts import validate_payload

UPSTREAM_FIELDS = ("format", "architecture", "num_layers", "hidden_dim", "vocab_size", "num_heads", "num_kv_heads",
                   "prompt", "encoded_tokens", "embedding", "layers", "final_norm", "logits_stats", "logits")
SLOTS = ("attn_norm", "qkv", "attn_out", "ffn_norm", "ffn_out", "output")


def test_f_apr_trace_json_payload_001(cli, tiny_path):
    """Upstream F-APR-TRACE-JSON-PAYLOAD-001: stdout is valid JSON with every upstream field, a layer_idx and
    six stat slots per layer, finite std_dev, no NaN/Inf on a healthy model, finite positive logits.l2_norm."""
    proc = cli("export", tiny_path, "--prompt", "What is 2+2?", "-o", "-")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # nothing but JSON on stdout
    for field in UPSTREAM_FIELDS:
        assert field in payload, field
    assert len(payload["layers"]) == payload["num_layers"]
    for i, layer in enumerate(payload["layers"]):
        assert layer["layer_idx"] == i
        for slot in SLOTS:
            s = layer[slot]
            assert s["std_dev"] is not None and math.isfinite(s["std_dev"])
            assert s["nan_count"] == 0 and s["inf_count"] == 0
    l2 = payload["logits"]["l2_norm"]
    assert l2 is not None and math.isfinite(l2) and l2 > 0
    assert payload["logits_stats"]["nan_count"] == 0


def test_payload_matches_json_schema(cli, tiny_path):
    proc = cli("export", tiny_path, "--tokens", "3,14,15,92,65", "--top-k", "20", "-o", "-")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    validate_payload(payload)
    assert payload["encoded_tokens"] == [3, 14, 15, 92, 65]
    assert len(payload["logits"]["top_k"]) == 20
    assert len(payload["token_texts"]) == 5
    probs = [t["prob"] for t in payload["logits"]["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert payload["config"]["sources"]["rope_theta"] == "file"
    assert len(payload["router"]) == payload["num_layers"]
    assert all(len(r["positions"]) == 5 for r in payload["router"])


def test_schema_rejects_a_payload_missing_an_upstream_field(cli, tiny_path):
    import jsonschema

    proc = cli("export", tiny_path, "--tokens", "1,2,3", "-o", "-")
    payload = json.loads(proc.stdout)
    del payload["final_norm"]
    with pytest.raises(jsonschema.ValidationError):
        validate_payload(payload)


def test_export_chat_prompt_to_file(cli, tiny_path, tmp_path):
    out = tmp_path / "trace.json"
    proc = cli("export", tiny_path, "--prompt", "Write fizzbuzz", "--chat", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    payload = json.loads(out.read_text())
    assert "<|im_start|>" in payload["token_texts"] and "<|im_end|>" in payload["token_texts"]


# Bad input through the real command (missing, non-GGUF and malformed files, token ids, sampling parameters):
# tests/traces/test_cli_bad_input.py.
