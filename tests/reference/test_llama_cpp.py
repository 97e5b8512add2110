"""Our engine against llama.cpp (llama-cpp-python, extra `peers`), the second engine: the same GGUF
file, the same tokens, every position's logits.

llama.cpp multiplies quantized weights with activations it quantizes to 8 bits, so its logits differ
from ours (and from Hugging Face's float32) by more than rounding; the bars say how much. Per position:
logit cosine >= 0.999 and the largest difference within 5% of the largest logit on quantized files
(measured: at most 3.8%, Q5_K), within 0.5% on F16 (measured: 0.09%); on the trained embedded model
the argmax is the same at every position. When llama-cpp-python is not installed
(it builds llama.cpp from source, several minutes), these tests are skipped: `make bench` installs it.
"""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `peers`) is not installed")

from engine.forward import forward  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.model import load_model  # noqa: E402

pytestmark = pytest.mark.reference

EMBEDDED = "workbench/models/stdlib-coder-q8_0.gguf"
# file -> (fixture spec, bar on max |logit difference| / max |logit|)
FILES = {"F16": ({"qtype": "F16"}, 0.005), "Q8_0": ({"qtype": "Q8_0"}, 0.05), "Q4_K": ({"qtype": "Q4_K"}, 0.05),
         "Q5_K": ({"qtype": "Q5_K"}, 0.05), "Q6_K": ({"qtype": "Q6_K"}, 0.05), "Q4_K_M": ({"qtype": "Q4_K_M"}, 0.05)}


def llama_logits(path, tokens) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def our_logits(path, tokens) -> np.ndarray:
    model = load_model(path)
    return forward(model, np.array(tokens), KVCache(model.config, len(tokens)), all_logits=True)


def compare(ours: np.ndarray, theirs: np.ndarray, bar: float) -> None:
    assert ours.shape == theirs.shape
    for t in range(ours.shape[0]):
        a, b = ours[t].astype(np.float64), theirs[t].astype(np.float64)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos >= 0.999, f"position {t}: logit cosine {cos:.5f}"
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel <= bar, f"position {t}: max |logit difference| is {rel:.3%} of the largest logit"


def test_embedded_model_matches_llama_cpp():
    model = load_model(EMBEDDED)
    tokens = model.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    ours, theirs = our_logits(EMBEDDED, tokens), llama_logits(EMBEDDED, tokens)
    compare(ours, theirs, 0.05)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("name", list(FILES))
def test_fixture_matches_llama_cpp(model_factory, name):
    spec, bar = FILES[name]
    path = model_factory(**spec)
    tokens = [1, 200, 33, 47, 5, 90, 310, 12, 77, 150, 8, 402]
    compare(our_logits(path, tokens), llama_logits(path, tokens), bar)


def decode_logits(path, tokens, backend: str) -> np.ndarray:
    """Our logits with every token a decode step of its own (one token per forward, through the cache)."""
    model = load_model(path, backend=backend)
    cache = KVCache.for_model(model, len(tokens))
    return np.concatenate([forward(model, np.array([t]), cache) for t in tokens])


Q8_FILES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")  # the types cpu-q8's kernels cover


@pytest.mark.skipif(__import__("engine.kernels.cpu_q8", fromlist=["x"]).unavailable() is not None,
                    reason="8-bit activations need AVX2 and F16C")
@pytest.mark.parametrize("name", Q8_FILES)
def test_cpu_q8_decode_matches_llama_cpp(model_factory, name):
    """The cpu-q8 backend's own parity test: decode steps with 8-bit activations against llama.cpp (which
    quantizes its activations too, in blocks of 256), within the same bars as the float32 path."""
    spec, bar = FILES[name]
    path = model_factory(**spec)
    tokens = [1, 200, 33, 47, 5, 90, 310, 12, 77, 150, 8, 402]
    theirs = llama_logits(path, tokens)
    q8 = decode_logits(path, tokens, "cpu-q8")
    compare(q8, theirs, bar)
    f32 = decode_logits(path, tokens, "cpu")
    assert not np.array_equal(q8, f32)  # the 8-bit kernels ran
    err = lambda ours: float(np.max(np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)))  # noqa: E731
    print(f"{name}: max |difference| / max |logit| vs llama.cpp: cpu-q8 {err(q8):.3%}, cpu {err(f32):.3%}")
