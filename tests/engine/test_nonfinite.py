"""NaN in the weights: the trace pinpoints layer, slot and counts; generation stops naming the first bad layer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from engine.errors import NonFiniteError
from engine.generate import generate
from engine.model import load_model
from engine.sampler import SamplingParams
from tests.gguf_edit import rewrite
from traces.tracing import trace_tokens

NAN, INF = 7, 8


@pytest.fixture(scope="module")
def poisoned(tiny_path, tmp_path_factory):
    name = "blk.1.attn_output.weight"
    t = next(t for t in GGUFReader(tiny_path).tensors if t.name == name)
    data = np.array(t.data, dtype=np.float32)
    data[3, 5] = np.nan  # one weight: output feature 3 of layer 1's attention projection
    out = tmp_path_factory.mktemp("nan") / "nan.gguf"
    return load_model(rewrite(tiny_path, out, replace_tensors={name: (data, None, QT.F32)}))


def test_trace_pinpoints_the_first_non_finite_layer_and_slot(poisoned):
    tokens = [5, 17, 42, 99]
    rec = trace_tokens(poisoned, tokens)
    for slot in ("attn_norm", "qkv", "attn_out", "ffn_norm", "ffn_out", "output"):
        assert rec.stats(0, slot)[:, NAN].sum() == 0  # layer 0 is clean
    assert rec.stats(1, "qkv")[:, NAN].sum() == 0
    bad = rec.stats(1, "attn_out")[:, NAN]
    assert np.all(bad == 1), bad  # exactly the one poisoned output feature, at every position


def test_generation_stops_with_a_message_naming_the_layer(poisoned):
    with pytest.raises(NonFiniteError) as e:
        list(generate(poisoned, [5, 17, 42], SamplingParams(temperature=0.0, max_tokens=4)))
    msg = str(e.value)
    assert "layer 1 attn_out" in msg and "\n" not in msg


def test_cli_generate_reports_it_in_one_line(cli, poisoned):
    proc = cli("generate", poisoned.path, "--tokens", "5,17,42", "--max-tokens", "3")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: generation stopped")
    assert "Traceback" not in proc.stderr


def test_cli_generate_streams_and_is_reproducible_with_a_seed(cli, tiny_path):
    args = ["generate", tiny_path, "--prompt", "def f(", "--temperature", "0.9", "--seed", "5", "--max-tokens", "10"]
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "tok/s" in a.stderr
