"""The fixture factory: writes qwen3moe GGUF files with any shape, in every supported block type.

Tests, benchmarks (`trace synth`) and the embedded model's export all write through here, with our
own block writer (engine/quantize.py) and gguf-py's GGUFWriter for the container. Tensors are
streamed one at a time, so the real Qwen3-30B-A3B shapes (~2 GB for 4 layers) are written without
holding the model in memory. With the same spec and seed, the bytes are identical.

Metadata keys are llama.cpp's for qwen3moe (`qwen3moe.block_count`, ...); tensor names follow
gguf-py's TENSOR_NAMES (`blk.{i}.ffn_gate_exps.weight`). Shapes below are numpy order
(rows, cols) = torch Linear (out_features, in_features); GGUF stores them reversed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quantize import quantize, random_blocks
from .quants import QT, row_bytes

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
NORMS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "output_norm")


@dataclass(frozen=True)
class SynthSpec:
    n_layers: int = 2
    hidden: int = 256  # K-quants need every row length to be a multiple of 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    n_experts: int = 8
    n_experts_used: int = 2
    moe_ff: int = 256
    vocab_size: int = 512
    context_length: int = 4096
    rope_theta: float | None = 1_000_000.0  # None: the key qwen3moe.rope.freq_base is absent
    rms_eps: float = 1e-6
    tie_embeddings: bool = False  # True: no output.weight
    qtype: str = "F32"  # one of QTYPES; norms and the router stay F32
    tokenizer: str | None = "bpe"  # "bpe" (trained on stdlib source), "synthetic", or None
    chat_template: str | None = "chatml"  # "chatml", None (no key), or a literal template
    seed: int = 0
    weights: str = "random"  # "random" (gaussian, quantized) or "random_blocks" (no float32 copy: huge files)
    qk_scale: float = 3.0  # pre-norm scale of q/k projections: large, as in real checkpoints
    name: str = "synth-qwen3moe"

    def __post_init__(self):
        if self.qtype not in QTYPES:
            raise ValueError(f"qtype must be one of {', '.join(QTYPES)}, got {self.qtype!r}")
        if self.weights not in ("random", "random_blocks"):
            raise ValueError(f"weights must be 'random' or 'random_blocks', got {self.weights!r}")


def shape_spec(shape: str, n_layers: int | None = None) -> SynthSpec:
    """Named shapes: 'qwen3-30b-a3b' is Qwen3-30B-A3B's (2048 wide, 32/4 heads of 128, 128 experts of 768,
    8 used, vocab 151936) as a Q4_K_M-style mix of random valid blocks with a synthetic vocabulary."""
    if shape == "qwen3-30b-a3b":
        return SynthSpec(n_layers=n_layers or 48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=128,
                         n_experts_used=8, moe_ff=768, vocab_size=151936, context_length=32768,
                         rope_theta=1_000_000.0, qtype="Q4_K_M", tokenizer="synthetic", weights="random_blocks",
                         name="synth-qwen3-30b-a3b")
    if shape == "tiny":
        return SynthSpec(n_layers=n_layers or 2)
    raise ValueError(f"unknown shape {shape!r} (tiny, qwen3-30b-a3b)")


def tensor_type(spec: SynthSpec, name: str) -> QT:
    """The GGML type of a tensor: norms and the router are F32; Q4_K_M mixes Q4_K and Q6_K like llama.cpp."""
    part = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    if part in NORMS or part == "ffn_gate_inp":
        return QT.F32
    if spec.qtype == "Q4_K_M":
        return QT.Q6_K if part in ("attn_v", "ffn_down_exps", "output") else QT.Q4_K
    return QT[spec.qtype]


def tensor_shapes(spec: SynthSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in file order, numpy shapes."""
    H, E, F = spec.hidden, spec.n_experts, spec.moe_ff
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = {"token_embd.weight": (spec.vocab_size, H), "output_norm.weight": (H,)}
    if not spec.tie_embeddings:
        shapes["output.weight"] = (spec.vocab_size, H)
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (H,), b + "attn_q.weight": (q, H), b + "attn_k.weight": (kv, H),
            b + "attn_v.weight": (kv, H), b + "attn_output.weight": (H, q), b + "attn_q_norm.weight": (spec.head_dim,),
            b + "attn_k_norm.weight": (spec.head_dim,), b + "ffn_norm.weight": (H,), b + "ffn_gate_inp.weight": (E, H),
            b + "ffn_gate_exps.weight": (E, F, H), b + "ffn_up_exps.weight": (E, F, H),
            b + "ffn_down_exps.weight": (E, H, F),
        })
    return shapes


def _random_f32(spec: SynthSpec, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    part = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    if part in NORMS:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if part == "token_embd":
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    scale = 1.0 / np.sqrt(shape[-1])
    if part in ("attn_q", "attn_k"):
        scale *= spec.qk_scale
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _tokenizer_data(spec: SynthSpec):
    from . import tokenizer as T

    if spec.tokenizer == "synthetic":
        data = T.synthetic_vocab(spec.vocab_size)
    elif spec.tokenizer == "bpe":
        data = T.train_byte_level_bpe(_stdlib_sample(), spec.vocab_size)
    else:
        raise ValueError(f"tokenizer must be 'bpe', 'synthetic' or None, got {spec.tokenizer!r}")
    return data


def _stdlib_sample(max_bytes: int = 400_000) -> list[str]:
    """Deterministic training text for fixture tokenizers: the first Python stdlib modules by name."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(root.glob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return texts


def write_model(path: str | os.PathLike, spec: SynthSpec, *, tensors: dict[str, np.ndarray] | None = None,
                tokenizer_data=None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete qwen3moe GGUF file for `spec`.

    tensors: float32 arrays by GGUF name (numpy orientation) replacing the random ones, e.g. a trained
    model's weights. tokenizer_data: an engine.tokenizer.TokenizerData replacing spec.tokenizer.
    progress: called with (bytes written, total bytes).
    """
    from gguf import GGUFWriter

    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    shapes = tensor_shapes(spec)
    tensors = tensors or {}
    for name, arr in tensors.items():
        if name not in shapes or tuple(arr.shape) != shapes[name]:
            raise ValueError(f"tensor {name}: shape {getattr(arr, 'shape', None)} does not fit the spec {shapes.get(name)}")

    w = GGUFWriter(path, arch="qwen3moe", use_temp_file=False)
    w.add_name(spec.name)
    a = "qwen3moe"
    w.add_uint32(f"{a}.block_count", spec.n_layers)
    w.add_uint32(f"{a}.context_length", spec.context_length)
    w.add_uint32(f"{a}.embedding_length", spec.hidden)
    w.add_uint32(f"{a}.feed_forward_length", spec.moe_ff)
    w.add_uint32(f"{a}.expert_feed_forward_length", spec.moe_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_kv_heads)
    w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", spec.rms_eps)
    if spec.rope_theta is not None:
        w.add_float32(f"{a}.rope.freq_base", spec.rope_theta)
    w.add_uint32(f"{a}.expert_count", spec.n_experts)
    w.add_uint32(f"{a}.expert_used_count", spec.n_experts_used)
    tok = tokenizer_data if tokenizer_data is not None else (_tokenizer_data(spec) if spec.tokenizer else None)
    if tok is not None:
        if len(tok.tokens) != spec.vocab_size:
            raise ValueError(f"the tokenizer has {len(tok.tokens)} tokens, the spec's vocab_size is {spec.vocab_size}")
        _add_tokenizer(w, tok, spec)

    types = {name: tensor_type(spec, name) for name in shapes}
    for name, shape in shapes.items():
        rb = row_bytes(types[name], shape[-1])
        byte_shape = shape[:-1] + (rb,)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=types[name])
    total = sum(int(np.prod(s[:-1])) * row_bytes(types[n], s[-1]) for n, s in shapes.items())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done = 0
    for name, shape in shapes.items():
        qt = types[name]
        if name in tensors:
            raw = quantize(np.asarray(tensors[name], dtype=np.float32), qt)
        elif spec.weights == "random_blocks" and qt != QT.F32:
            raw = random_blocks(qt, shape, rng)
        elif spec.weights == "random_blocks" and len(shape) == 2:  # the router: distinct, untied choices
            raw = quantize(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1]), qt)
        else:
            raw = quantize(_random_f32(spec, name, shape, rng), qt)
        w.write_tensor_data(np.ascontiguousarray(raw))
        done += raw.nbytes
        if progress is not None:
            progress(done, total)
    w.close()
    return path


def _add_tokenizer(w, tok, spec: SynthSpec) -> None:
    from gguf import GGUFValueType

    for key, value in tok.to_metadata().items():
        if key == "tokenizer.chat_template":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            raise TypeError(f"tokenizer metadata {key}: unsupported value type {type(value).__name__}")
    template = spec.chat_template
    if template == "chatml":
        from .tokenizer import CHATML_TEMPLATE

        template = tok.chat_template or CHATML_TEMPLATE
    if template:
        w.add_key_value("tokenizer.chat_template", template, GGUFValueType.STRING)


