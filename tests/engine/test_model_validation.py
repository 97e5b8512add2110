"""Bad model files are refused before any kernel runs, each with a one-line error naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFValueType

from engine.errors import GGUFFormatError, ModelValidationError, WorkbenchError
from engine.model import load_model
from tests.gguf_edit import rewrite


def one_line(exc: Exception) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(GGUFFormatError) as e:
        load_model(tmp_path / "absent.gguf")
    assert "no such file" in one_line(e.value)


@pytest.mark.parametrize("content", [b"", b"GGU", b"GGML" + b"\0" * 100, b"FUGG" + b"\0" * 100,
                                     b"GGUF" + (99).to_bytes(4, "little") + b"\0" * 100])
def test_not_a_gguf(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFFormatError) as e:
        load_model(p)
    one_line(e.value)


def test_wrong_architecture(tiny_path, tmp_path):
    bad = rewrite(tiny_path, tmp_path / "llama.gguf", set_kv={"general.architecture": ("llama", GGUFValueType.STRING)})
    with pytest.raises(ModelValidationError) as e:
        load_model(bad)
    assert "'llama'" in one_line(e.value)


def test_missing_tensor(tiny_path, tmp_path):
    bad = rewrite(tiny_path, tmp_path / "missing.gguf", drop_tensors={"blk.1.attn_k_norm.weight"})
    with pytest.raises(ModelValidationError) as e:
        load_model(bad)
    assert "blk.1.attn_k_norm.weight" in one_line(e.value) and "missing" in str(e.value)


def test_shape_disagrees_with_metadata(tiny_path, tmp_path):
    bad = rewrite(tiny_path, tmp_path / "shape.gguf",
                  set_kv={"qwen3moe.expert_feed_forward_length": (512, GGUFValueType.UINT32)})
    with pytest.raises(ModelValidationError) as e:
        load_model(bad)
    assert "ffn_gate_exps" in one_line(e.value)


def test_expert_used_count_above_expert_count(tiny_path, tmp_path):
    bad = rewrite(tiny_path, tmp_path / "experts.gguf", set_kv={"qwen3moe.expert_used_count": (99, GGUFValueType.UINT32)})
    with pytest.raises(ModelValidationError) as e:
        load_model(bad)
    assert "expert_used_count 99" in one_line(e.value)


def test_head_counts_that_do_not_divide(tiny_path, tmp_path):
    bad = rewrite(tiny_path, tmp_path / "heads.gguf", set_kv={"qwen3moe.attention.head_count_kv": (3, GGUFValueType.UINT32)})
    with pytest.raises(ModelValidationError) as e:
        load_model(bad)
    assert "head_count_kv 3" in one_line(e.value)


def test_tokenizer_vocab_differs_from_embedding(tiny_path, tmp_path):
    from gguf import GGUFReader

    tokens = list(GGUFReader(tiny_path).fields["tokenizer.ggml.tokens"].contents())
    bad = rewrite(tiny_path, tmp_path / "vocab.gguf",
                  set_kv={"tokenizer.ggml.tokens": (tokens[:-1], GGUFValueType.ARRAY, GGUFValueType.STRING)})
    with pytest.raises(WorkbenchError) as e:
        load_model(bad)
    one_line(e.value)


@pytest.mark.parametrize("key, value", [
    ("tokenizer.ggml.tokens", (list(range(512)), GGUFValueType.ARRAY, GGUFValueType.INT32)),
    ("tokenizer.ggml.token_type", (["1"] * 512, GGUFValueType.ARRAY, GGUFValueType.STRING)),
    ("tokenizer.ggml.token_type", ([1] * 7, GGUFValueType.ARRAY, GGUFValueType.INT32)),
    ("tokenizer.ggml.merges", ([1, 2], GGUFValueType.ARRAY, GGUFValueType.INT32)),
    ("tokenizer.ggml.tokens", ("abc", GGUFValueType.STRING)),
])
def test_tokenizer_arrays_of_the_wrong_type_or_length(tiny_path, tmp_path, key, value):
    bad = rewrite(tiny_path, tmp_path / "tok.gguf", set_kv={key: value})
    with pytest.raises(WorkbenchError) as e:
        load_model(bad)
    assert key in one_line(e.value)


def test_truncated_tensor_data(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-1])
    with pytest.raises(GGUFFormatError) as e:
        load_model(p)
    one_line(e.value)


def test_weights_stay_memory_mapped(tiny_model):
    q = tiny_model.layers[0].ffn_gate_exps.raw
    assert not q.flags.writeable
    base = q
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) or isinstance(q.base, np.memmap) or hasattr(q, "filename")
