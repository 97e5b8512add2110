"""The fixture factory writes well-formed qwen3moe GGUF files, read back with gguf-py's own reader."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from engine.synth import QTYPES, SynthSpec, shape_spec, tensor_shapes, write_model


def read(path):
    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (QT(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist()))) for t in r.tensors}
    return fields, tensors


@pytest.mark.parametrize("qtype", QTYPES)
def test_every_type_writes_a_readable_model(qtype, tmp_path):
    spec = SynthSpec(qtype=qtype, tokenizer=None)
    fields, tensors = read(write_model(tmp_path / "m.gguf", spec))
    assert fields["general.architecture"] == "qwen3moe"
    assert fields["qwen3moe.expert_count"] == 8 and fields["qwen3moe.expert_used_count"] == 2
    assert set(tensors) == set(tensor_shapes(spec))
    for name, shape in tensor_shapes(spec).items():
        qt, got = tensors[name]
        assert got == shape, name
        if len(shape) == 1 or "ffn_gate_inp" in name:
            assert qt == QT.F32
        elif qtype == "Q4_K_M":
            part = name.split(".")[-2]
            want = QT.Q6_K if part in ("attn_v", "ffn_down_exps", "output") else QT.Q4_K
            assert qt == want, name
        else:
            assert qt == QT[qtype]


def test_rope_key_absent_and_tied_embeddings(tmp_path):
    fields, tensors = read(write_model(tmp_path / "m.gguf", SynthSpec(rope_theta=None, tie_embeddings=True, tokenizer=None)))
    assert "qwen3moe.rope.freq_base" not in fields
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_model(tmp_path / "a.gguf", SynthSpec(qtype="Q4_K", seed=3)).read_bytes()
    b = write_model(tmp_path / "b.gguf", SynthSpec(qtype="Q4_K", seed=3)).read_bytes()
    c = write_model(tmp_path / "c.gguf", SynthSpec(qtype="Q4_K", seed=4)).read_bytes()
    assert a == b and a != c


def test_tokenizer_and_template_metadata(tmp_path):
    fields, _ = read(write_model(tmp_path / "m.gguf", SynthSpec(vocab_size=600)))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"]) == 600
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


@pytest.mark.parametrize("changes", [{"head_dim": 128, "n_heads": 4, "n_kv_heads": 1}, {"n_experts": 16, "n_experts_used": 4}])
def test_other_shapes(changes, tmp_path):
    spec = SynthSpec(qtype="Q8_0", tokenizer=None, **changes)
    _, tensors = read(write_model(tmp_path / "m.gguf", spec))
    assert tensors["blk.0.ffn_gate_exps.weight"][1] == (spec.n_experts, spec.moe_ff, spec.hidden)
    assert tensors["blk.0.attn_q.weight"][1] == (spec.n_heads * spec.head_dim, spec.hidden)


def test_trained_weights_replace_random_ones(tmp_path):
    spec = SynthSpec(tokenizer=None)
    w = np.full((spec.hidden,), 0.5, np.float32)
    path = write_model(tmp_path / "m.gguf", spec, tensors={"blk.1.ffn_norm.weight": w})
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_norm.weight")
    assert np.array_equal(np.asarray(t.data), w)
    with pytest.raises(ValueError, match="does not fit"):
        write_model(tmp_path / "bad.gguf", spec, tensors={"blk.1.ffn_norm.weight": np.zeros(3, np.float32)})


def test_qwen3_30b_shapes_one_layer(tmp_path):
    spec = shape_spec("qwen3-30b-a3b", 1)
    path = write_model(tmp_path / "big.gguf", spec)
    fields, tensors = read(path)
    assert tensors["blk.0.ffn_gate_exps.weight"] == (QT.Q4_K, (128, 768, 2048))
    assert tensors["blk.0.ffn_down_exps.weight"] == (QT.Q6_K, (128, 2048, 768))
    assert tensors["blk.0.attn_q.weight"][1] == (4096, 2048) and tensors["blk.0.attn_k.weight"][1] == (512, 2048)
    assert tensors["token_embd.weight"][1] == (151936, 2048)
    assert len(fields["tokenizer.ggml.tokens"]) == 151936
    assert 0.7e9 < path.stat().st_size < 1.0e9  # embeddings 175 MB, lm_head 255 MB, one layer ~400 MB
