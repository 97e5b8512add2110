"""Our GGUF metadata reader against gguf-py's GGUFReader (the oracle), on every kind of fixture file."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from engine.gguf_file import open_gguf

FIXTURES = {
    "f32-tiny": {},
    "q4_k_m-synthetic-vocab": dict(qtype="Q4_K_M", tokenizer="synthetic"),
    "no-rope-key-tied-template": dict(rope_theta=None, tie_embeddings=True, chat_template="{{ messages }}"),
}


def reader_metadata(path) -> dict:
    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            value = list(value)
        out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_metadata_equals_gguf_py(model_factory, name):
    path = model_factory(**FIXTURES[name])
    ours = open_gguf(path).metadata
    theirs = reader_metadata(path)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        assert ours[key] == value, key
    assert isinstance(ours["tokenizer.ggml.tokens"][0], str) and len(ours["tokenizer.ggml.tokens"]) > 100


def test_embedded_model_metadata_and_tensors_equal_gguf_py():
    path = "workbench/models/stdlib-coder-q4_k_m.gguf"
    f = open_gguf(path)
    assert f.metadata == reader_metadata(path)
    reader = GGUFReader(path)
    assert sorted(f.tensors) == sorted(t.name for t in reader.tensors)
    for t in reader.tensors:
        ours = f.tensors[t.name]
        assert int(ours.qtype) == int(t.tensor_type)
        assert np.array_equal(np.asarray(ours.raw).ravel(), np.asarray(t.data).view(np.uint8).ravel()), t.name
