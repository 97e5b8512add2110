"""The fixture factory writes well-formed qwen3moe GGUF files, read back with gguf-py's own reader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from engine.synth import QTYPES, SynthSpec, q4_k_m_types, shape_spec, tensor_shapes, write_model
from engine.tokenizer import CHATML_TEMPLATE

SMALL = SynthSpec(tokenizer=None)


def read(path):
    """(fields {key: value}, tensors {name: (type, numpy shape)}, reader)."""
    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (QT(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist()))) for t in r.tensors}
    return fields, tensors, r


def weights(reader, name) -> np.ndarray:
    """A tensor of the file dequantized by gguf-py, numpy orientation."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))


@pytest.mark.parametrize("qtype", QTYPES)
def test_every_type_writes_a_readable_model(qtype, tmp_path):
    spec = dataclasses.replace(SMALL, qtype=qtype)
    fields, tensors, _ = read(write_model(tmp_path / "m.gguf", spec))
    assert fields["general.architecture"] == "qwen3moe"
    assert list(tensors) == list(tensor_shapes(spec))
    for name, shape in tensor_shapes(spec).items():
        qt, got = tensors[name]
        assert got == shape, name
        if len(shape) == 1 or ".ffn_gate_inp." in name:
            assert qt == QT.F32, name
        else:
            assert qt == (q4_k_m_types(name) if qtype == "Q4_K_M" else QT[qtype]), name
    file_types = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q4_K_M": 15, "BF16": 32}
    assert fields["general.file_type"] == file_types[qtype]


def test_the_q4_k_m_mix():
    six = ["output.weight", "blk.0.attn_v.weight", "blk.7.ffn_down_exps.weight"]
    four = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.3.attn_output.weight",
            "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"]
    f32 = ["output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.2.attn_q_norm.weight",
           "blk.2.attn_k_norm.weight", "blk.0.ffn_gate_inp.weight"]
    assert [q4_k_m_types(n) for n in six + four + f32] == [QT.Q6_K] * 3 + [QT.Q4_K] * 6 + [QT.F32] * 6


def test_model_metadata_keys_values_and_types(tmp_path):
    spec = SynthSpec(n_layers=3, n_heads=8, n_kv_heads=2, head_dim=32, n_experts=16, n_experts_used=4, moe_ff=512,
                     context_length=1234, rope_theta=500_000.0, rms_eps=1e-5, tokenizer=None, name="meta-test")
    fields, _, r = read(write_model(tmp_path / "m.gguf", spec))
    want = {
        "general.name": "meta-test", "qwen3moe.block_count": 3, "qwen3moe.context_length": 1234,
        "qwen3moe.embedding_length": 256, "qwen3moe.feed_forward_length": 512,
        "qwen3moe.expert_feed_forward_length": 512, "qwen3moe.attention.head_count": 8,
        "qwen3moe.attention.head_count_kv": 2, "qwen3moe.attention.key_length": 32,
        "qwen3moe.attention.value_length": 32, "qwen3moe.expert_count": 16, "qwen3moe.expert_used_count": 4,
        "general.quantization_version": 2,
    }
    for key, value in want.items():
        assert fields[key] == value, key
        assert r.fields[key].types == [GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32], key
    for key, value in {"qwen3moe.rope.freq_base": 500_000.0, "qwen3moe.attention.layer_norm_rms_epsilon": 1e-5}.items():
        assert fields[key] == pytest.approx(value, rel=1e-6) and r.fields[key].types == [GGUFValueType.FLOAT32]
    assert not any(k.startswith("tokenizer.") for k in fields)


def test_rope_key_absent_and_tied_embeddings(tmp_path):
    fields, tensors, _ = read(write_model(tmp_path / "m.gguf", dataclasses.replace(SMALL, rope_theta=None,
                                                                                 tie_embeddings=True)))
    assert "qwen3moe.rope.freq_base" not in fields
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = SynthSpec(qtype="Q4_K_M", seed=3, n_layers=1)
    a = write_model(tmp_path / "a.gguf", spec).read_bytes()
    b = write_model(tmp_path / "b.gguf", spec).read_bytes()
    c = write_model(tmp_path / "c.gguf", dataclasses.replace(spec, seed=4)).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_one_seed_holds_the_same_weights_in_every_type(tmp_path):
    # vocab 600: output.weight as Q6_K is 126000 bytes, so the tensors after it sit behind alignment padding
    spec = dataclasses.replace(SMALL, vocab_size=600)
    *_, exact = read(write_model(tmp_path / "f32.gguf", spec))
    *_, q6 = read(write_model(tmp_path / "q6.gguf", dataclasses.replace(spec, qtype="Q6_K")))
    for name in ("output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight"):
        x, y = weights(exact, name), weights(q6, name)
        assert np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2)) < 0.025, name
    for name in ("blk.0.attn_norm.weight", "blk.1.ffn_gate_inp.weight"):  # F32 in both files
        assert np.array_equal(weights(exact, name), weights(q6, name)), name


def test_tokenizer_and_template_metadata(tmp_path):
    fields, _, r = read(write_model(tmp_path / "m.gguf", SynthSpec(vocab_size=600)))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 600 and len(fields["tokenizer.ggml.token_type"]) == 600
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] in ("<|endoftext|>", "<|im_end|>")
    assert fields["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert r.fields["tokenizer.ggml.tokens"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert r.fields["tokenizer.ggml.token_type"].types == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert r.fields["tokenizer.ggml.eos_token_id"].types == [GGUFValueType.UINT32]


LITERAL = "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("template, want", [(None, None), (LITERAL, LITERAL)], ids=["none", "literal"])
def test_chat_template_choices(template, want, tmp_path):
    spec = SynthSpec(tokenizer="synthetic", chat_template=template, n_layers=1)
    fields, _, _ = read(write_model(tmp_path / "m.gguf", spec))
    assert len(fields["tokenizer.ggml.tokens"]) == spec.vocab_size
    assert fields.get("tokenizer.chat_template") == want


@pytest.mark.parametrize("changes", [{"head_dim": 128, "n_heads": 4, "n_kv_heads": 1},
                                     {"n_experts": 16, "n_experts_used": 4}], ids=["head_dim-128", "16-experts"])
def test_other_shapes(changes, tmp_path):
    spec = dataclasses.replace(SMALL, qtype="Q4_K_M", **changes)
    fields, tensors, _ = read(write_model(tmp_path / "m.gguf", spec))
    assert tensors["blk.0.ffn_gate_exps.weight"] == (QT.Q4_K, (spec.n_experts, spec.moe_ff, spec.hidden))
    assert tensors["blk.0.ffn_down_exps.weight"] == (QT.Q6_K, (spec.n_experts, spec.hidden, spec.moe_ff))
    assert tensors["blk.0.ffn_gate_inp.weight"] == (QT.F32, (spec.n_experts, spec.hidden))
    assert tensors["blk.1.attn_q.weight"][1] == (spec.n_heads * spec.head_dim, spec.hidden)
    assert tensors["blk.1.attn_output.weight"][1] == (spec.hidden, spec.n_heads * spec.head_dim)
    assert tensors["blk.1.attn_k_norm.weight"][1] == (spec.head_dim,)
    assert fields["qwen3moe.attention.key_length"] == spec.head_dim
    assert fields["qwen3moe.expert_count"] == spec.n_experts


def test_random_weights_are_numerically_healthy(tmp_path):
    *_, r = read(write_model(tmp_path / "m.gguf", dataclasses.replace(SMALL, qtype="Q4_K_M")))
    norm = weights(r, "blk.0.attn_norm.weight")
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.2
    down = weights(r, "blk.0.ffn_down_exps.weight")  # (E, hidden, moe_ff)
    assert abs(down.std() * np.sqrt(down.shape[-1]) - 1) < 0.1
    # the router: distinct top-k choices (no ties), and every expert chosen by some token
    emb = weights(r, "token_embd.weight")[:64]
    h = emb / np.sqrt(np.mean(emb ** 2, axis=1, keepdims=True))
    logits = h @ weights(r, "blk.0.ffn_gate_inp.weight").T  # (T, E)
    top = np.sort(logits, axis=1)[:, ::-1]
    assert np.all(top[:, 1] - top[:, 2] > 1e-4) and np.all(top[:, 0] - top[:, 1] > 1e-6)
    assert len(set(np.argsort(-logits, axis=1)[:, :2].ravel().tolist())) == SMALL.n_experts


def test_trained_weights_replace_random_ones(tmp_path):
    spec = dataclasses.replace(SMALL, qtype="Q4_K_M")
    norm = np.full((spec.hidden,), 0.5, np.float32)
    gate = np.random.default_rng(9).standard_normal((8, 256, 256)).astype(np.float32) * 0.1
    plain = write_model(tmp_path / "plain.gguf", spec)
    given = {"blk.1.ffn_norm.weight": norm, "blk.0.ffn_gate_exps.weight": gate}
    path = write_model(tmp_path / "m.gguf", spec, tensors=given)
    *_, r = read(path)
    *_, r0 = read(plain)
    assert np.array_equal(weights(r, "blk.1.ffn_norm.weight"), norm)
    got = weights(r, "blk.0.ffn_gate_exps.weight")
    assert np.sqrt(np.mean((got - gate) ** 2) / np.mean(gate ** 2)) < 0.09
    # the tensors not given keep their random weights, byte for byte
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_exps.weight", "output.weight"):
        a, b = (next(t for t in rr.tensors if t.name == name) for rr in (r, r0))
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), name


@pytest.mark.parametrize("tensors, match", [
    ({"blk.1.ffn_norm.weight": np.zeros(3, np.float32)}, "does not fit"),
    ({"blk.9.ffn_norm.weight": np.zeros(256, np.float32)}, "not part of this model"),
    ({"blk.0.attn_norm.weight": np.full(256, np.nan, np.float32)}, "NaN"),
])
def test_bad_given_tensors_are_refused_and_leave_no_file(tensors, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path / "bad.gguf", SMALL, tensors=tensors)
    assert list(tmp_path.iterdir()) == []


def test_rows_that_k_quants_cannot_hold_are_refused(tmp_path):
    # q is n_heads * head_dim = 192 wide: attn_output's rows cannot be Q4_K blocks
    with pytest.raises(ValueError, match=r"blk\.0\.attn_output\.weight .* Q4_K: row length 192"):
        write_model(tmp_path / "bad.gguf", dataclasses.replace(SMALL, head_dim=48, qtype="Q4_K"))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model(tmp_path / "m.gguf", SMALL, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_byte(tmp_path):
    calls = []
    path = write_model(tmp_path / "m.gguf", dataclasses.replace(SMALL, qtype="Q6_K"),
                       progress=lambda done, total: calls.append((done, total)))
    *_, r = read(path)
    total = sum(int(t.n_bytes) for t in r.tensors)
    assert calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_qwen3_30b_shapes_one_layer(tmp_path):
    spec = dataclasses.replace(shape_spec("qwen3-30b-a3b", 1), tokenizer=None)  # gguf-py reads 151936 tokens slowly
    path = write_model(tmp_path / "big.gguf", spec)
    fields, tensors, r = read(path)
    assert fields["qwen3moe.block_count"] == 1 and fields["qwen3moe.expert_count"] == 128
    assert tensors["blk.0.ffn_gate_exps.weight"] == (QT.Q4_K, (128, 768, 2048))
    assert tensors["blk.0.ffn_down_exps.weight"] == (QT.Q6_K, (128, 2048, 768))
    assert tensors["blk.0.attn_q.weight"] == (QT.Q4_K, (4096, 2048))
    assert tensors["blk.0.attn_k.weight"] == (QT.Q4_K, (512, 2048))
    assert tensors["blk.0.attn_v.weight"] == (QT.Q6_K, (512, 2048))
    assert tensors["token_embd.weight"] == (QT.Q4_K, (151936, 2048))
    assert tensors["output.weight"] == (QT.Q6_K, (151936, 2048))
    data = sum(int(t.n_bytes) for t in r.tensors)
    assert data < path.stat().st_size < data + 100_000  # embeddings 175 MB, lm_head 255 MB, the layer ~400 MB
    # random valid blocks dequantize to healthy weights: std 1/sqrt(fan-in)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up_exps.weight")
    one_expert = np.asarray(dequantize(np.asarray(t.data)[0], t.tensor_type))
    assert np.all(np.isfinite(one_expert)) and abs(one_expert.std() * np.sqrt(2048) - 1) < 0.1


@pytest.mark.slow
def test_qwen3_30b_with_its_vocabulary(tmp_path):
    fields, tensors, _ = read(write_model(tmp_path / "big.gguf", shape_spec("qwen3-30b-a3b", 1)))
    assert len(fields["tokenizer.ggml.tokens"]) == 151936 == tensors["token_embd.weight"][1][0]
    assert fields["general.file_type"] == 15
