"""8-bit activations (engine/kernels/cpu_q8.py, the cpu-q8 backend) against gguf-py.

The oracle: gguf-py quantizes the input as a Q8_0 tensor and dequantizes it and the weights; numpy
multiplies in float64. Our kernels must give that product to float32 rounding, and the codes and
scales of the quantized input must be gguf-py's bytes exactly. The model-level comparison with
llama.cpp is in tests/reference/test_llama_cpp.py; with the float32 path in test_forward.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from engine import kernels as K
from engine.backend import BackendUnavailable, check_available
from engine.kernels import cpu_q8
from tests.engine.test_kernels import assert_dot_close, oracle, random_weights, same_bits

pytestmark = pytest.mark.skipif(cpu_q8.unavailable() is not None, reason=str(cpu_q8.unavailable()))

Q8_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)
name = lambda q: q.name  # noqa: E731


def gguf_q8(x: np.ndarray):
    """gguf-py's Q8_0 of x (m, C): codes int8 (m, C), scales float32 (m, C/32), and the dequantized x."""
    blocks = quantize(x, QT.Q8_0).reshape(x.shape[0], -1, 34)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(x.shape)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    return codes, scales, np.asarray(dequantize(blocks.reshape(x.shape[0], -1), QT.Q8_0), np.float32)


def test_quantized_input_is_gguf_py_q8_0_byte_for_byte():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 1024)) * rng.uniform(1e-3, 300, (4, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, 32:64] = -0.0
    x[2, 64:96] = 1e-30  # tiny but normal
    # exact ties: amax 127 gives d = 1, so x * id lands on .5 and rounds away from zero
    x[3, 96:128] = np.linspace(-127, 127, 32).round() + np.where(np.arange(32) % 2, 0.5, -0.5)
    x[3, 96] = 127.0
    codes, xa = cpu_q8.quantize_rows(np.ascontiguousarray(x))
    xd, xsum = cpu_q8.scales_and_sums(xa)
    want_codes, want_scales, want_x = gguf_q8(x)
    assert np.array_equal(codes, want_codes)
    assert same_bits(xd, want_scales)
    # xsum is the sum of each dequantized block of 32
    assert np.allclose(xsum, want_x.reshape(4, -1, 32).sum(-1, dtype=np.float64), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("qt", Q8_TYPES, ids=name)
def test_matvec_is_the_product_with_gguf_py_dequantized_input(qt):
    rng = np.random.default_rng(int(qt))
    cols = 768
    raw = random_weights(qt, (37,), cols, rng)  # 37 rows: a chunk of 16 rows is not a divisor
    x = (rng.standard_normal(cols) * 3).astype(np.float32)
    out = np.empty(37, np.float32)
    K.matvec(qt, raw, x, out, q8=True)
    assert_dot_close(out[None], oracle(qt, raw), gguf_q8(x[None])[2])


@pytest.mark.parametrize("qt", Q8_TYPES, ids=name)
@pytest.mark.parametrize("kx", [1, 4])
def test_expert_matmul_one_token_is_each_experts_matvec(qt, kx):
    rng = np.random.default_rng(10 + kx)
    cols, rows, experts, k = 512, 24, 6, 4
    raw = random_weights(qt, (experts, rows), cols, rng)
    sel = np.array([[5, 0, 3, 2]], np.int32)
    x = rng.standard_normal((1, kx, cols)).astype(np.float32)
    out = np.empty((1, k, rows), np.float32)
    K.expert_matmul(qt, raw, sel, x, out, q8=True)
    for j in range(k):
        one = np.empty(rows, np.float32)
        K.matvec(qt, raw[sel[0, j]], np.ascontiguousarray(x[0, j if kx == k else 0]), one, q8=True)
        assert same_bits(out[0, j], one)
        assert_dot_close(out[0, j][None], oracle(qt, raw[sel[0, j]]), gguf_q8(x[0, j if kx == k else 0][None])[2])


@pytest.mark.parametrize("qt", Q8_TYPES, ids=name)
def test_a_non_finite_input_gives_non_finite_outputs(qt):
    rng = np.random.default_rng(3)
    raw = random_weights(qt, (8,), 512, rng)
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal(512).astype(np.float32)
        x[300] = bad
        out = np.empty(8, np.float32)
        K.matvec(qt, raw, x, out, q8=True)
        assert not np.isfinite(out).any(), bad


@pytest.mark.parametrize("qt, cols", [(QT.F32, 256), (QT.F16, 256), (QT.BF16, 256), (QT.Q8_0, 96)],
                         ids=["F32", "F16", "BF16", "Q8_0-96"])
def test_other_types_and_partial_blocks_ignore_q8(qt, cols):
    """Float weights, and Q8_0 rows that are not whole 256-weight blocks, keep the float32 kernels."""
    rng = np.random.default_rng(4)
    raw = random_weights(qt, (20,), cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    a, b = np.empty(20, np.float32), np.empty(20, np.float32)
    K.matvec(qt, raw, x, a)
    K.matvec(qt, raw, x, b, q8=True)
    assert same_bits(a, b)


@pytest.mark.parametrize("qt", Q8_TYPES, ids=name)
def test_batches_ignore_q8(qt):
    """Prefill (n > 1) keeps the float32 tiled kernels: q8 changes single-token products only."""
    rng = np.random.default_rng(5)
    raw = random_weights(qt, (20,), 256, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    a, b = np.empty((3, 20), np.float32), np.empty((3, 20), np.float32)
    K.matmul(qt, raw, x, a)
    K.matmul(qt, raw, x, b, q8=True)
    assert same_bits(a, b)


def test_8_bit_differs_from_float32_by_the_input_rounding_only():
    """The q8 product is not the float32 one (else this mode would be doing nothing), and is as close to it
    as 8-bit inputs allow."""
    rng = np.random.default_rng(6)
    raw = random_weights(QT.Q6_K, (64,), 1024, rng)
    x = rng.standard_normal(1024).astype(np.float32)
    a, b = np.empty(64, np.float32), np.empty(64, np.float32)
    K.matvec(QT.Q6_K, raw, x, a)
    K.matvec(QT.Q6_K, raw, x, b, q8=True)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-6 < rel < 2e-2, rel


@pytest.fixture
def cpu_without_avx2(monkeypatch):
    from llvmlite import binding

    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: {"sse2": True})
    cpu_q8.unavailable.cache_clear()  # the answer is cached per process
    yield
    cpu_q8.unavailable.cache_clear()


def test_a_cpu_without_avx2_gets_one_line(cpu_without_avx2):
    with pytest.raises(BackendUnavailable) as err:
        check_available("cpu-q8")
    assert "AVX2" in str(err.value) and "avx2 and f16c" in str(err.value) and "\n" not in str(err.value)
    # the kernels' own entry refuses too, before anything is compiled for the missing instructions
    raw = random_weights(QT.Q4_K, (4,), 256, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="AVX2"):
        K.matvec(QT.Q4_K, raw, np.ones(256, np.float32), np.empty(4, np.float32), q8=True)


def test_cli_runs_the_cpu_q8_backend_and_the_payload_says_so(cli, model_factory, tmp_path):
    import json

    path = model_factory(qtype="Q4_K_M")
    proc = cli("export", path, "--tokens", "1,200,33", "--backend", "cpu-q8", "-o", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "t.json").read_text())["engine"]["backend"] == "cpu-q8"
    gen = cli("generate", path, "--tokens", "1,200,33", "--backend", "cpu-q8", "--max-tokens", "4", "--seed", "1")
    assert gen.returncode == 0, gen.stderr
