"""The fixture factory: writes qwen3moe GGUF files of any shape, in every type we write.

Tests, benchmarks (`trace synth`) and the export of a trained model all write through here: our own
block writer (engine/quantize.py) for the tensor bytes, gguf-py's GGUFWriter for the header, the
metadata and the tensor infos. Tensor data is streamed in chunks of rows, so the real Qwen3-30B-A3B
shapes (about 2 GB for 4 layers) are written in seconds with little memory.

Same spec, same bytes: every tensor draws from its own generator seeded by (spec.seed, crc32(name)),
so a tensor's weights do not depend on the file's type, on which other tensors exist or were given,
and an F32 and a Q4_K_M file of one seed hold the same underlying weights.

Metadata keys are llama.cpp's for qwen3moe (`qwen3moe.block_count`, ...), written through GGUFWriter's
own add_* methods; tensor names follow gguf-py's TENSOR_NAMES (`blk.{i}.ffn_gate_exps.weight`). Shapes
here are numpy order (rows, cols) = torch Linear (out_features, in_features); GGUF stores them reversed.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quantize import quantize, random_blocks
from .quants import QT, row_bytes

ARCH = "qwen3moe"
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
NORMS = frozenset({"attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "output_norm"})
Q4_K_M_SIX = frozenset({"attn_v", "ffn_down_exps", "output"})  # the tensors a Q4_K_M file keeps at Q6_K
CHUNK_ELEMS = 1 << 22  # elements generated and quantized per step while streaming a tensor

# general.file_type as llama.cpp's quantizer writes it (gguf.LlamaFileType)
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q4_K_M": 15, "BF16": 32}


@dataclass(frozen=True)
class SynthSpec:
    n_layers: int = 2
    hidden: int = 256  # K-quants need every row length (hidden, n_heads*head_dim, moe_ff) a multiple of 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64  # q is n_heads*head_dim wide, which need not equal hidden
    n_experts: int = 8
    n_experts_used: int = 2
    moe_ff: int = 256  # expert_feed_forward_length, the row length of ffn_down_exps
    vocab_size: int = 512
    context_length: int = 4096
    rope_theta: float | None = 1_000_000.0  # None: the key qwen3moe.rope.freq_base is absent
    rms_eps: float = 1e-6
    tie_embeddings: bool = False  # True: no output.weight, the lm_head is token_embd
    qtype: str = "F32"  # one of QTYPES; norms and the router stay F32
    tokenizer: str | None = "bpe"  # "bpe" (trained on stdlib source), "synthetic", or None (no tokenizer.* keys)
    chat_template: str | None = "chatml"  # "chatml", None (no key) or a literal template; needs a tokenizer
    seed: int = 0
    weights: str = "random"  # "random" (gaussian, quantized) or "random_blocks" (no float32 copy: huge files)
    qk_scale: float = 3.0  # q/k projections are this much larger than 1/sqrt(fan-in), as in real checkpoints
    name: str = "synth-qwen3moe"

    def __post_init__(self):
        if self.qtype not in QTYPES:
            raise ValueError(f"qtype must be one of {', '.join(QTYPES)}, got {self.qtype!r}")
        if self.weights not in ("random", "random_blocks"):
            raise ValueError(f"weights must be 'random' or 'random_blocks', got {self.weights!r}")
        if self.tokenizer not in ("bpe", "synthetic", None):
            raise ValueError(f"tokenizer must be 'bpe', 'synthetic' or None, got {self.tokenizer!r}")
        for field in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "n_experts", "n_experts_used",
                      "moe_ff", "vocab_size", "context_length"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts_used > self.n_experts:
            raise ValueError(f"n_experts_used {self.n_experts_used} exceeds n_experts {self.n_experts}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


def shape_spec(shape: str, n_layers: int | None = None) -> SynthSpec:
    """Named shapes. 'qwen3-30b-a3b': Qwen3-30B-A3B's (2048 wide, 32/4 heads of 128, 128 experts of 768,
    8 used, vocab 151936, 48 layers unless n_layers) as a Q4_K_M mix of random valid blocks with a
    synthetic vocabulary. 'tiny': the SynthSpec defaults."""
    if shape == "qwen3-30b-a3b":
        return SynthSpec(n_layers=n_layers or 48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=128,
                         n_experts_used=8, moe_ff=768, vocab_size=151936, context_length=32768,
                         rope_theta=1_000_000.0, qtype="Q4_K_M", tokenizer="synthetic", weights="random_blocks",
                         name="synth-qwen3-30b-a3b")
    if shape == "tiny":
        return SynthSpec(n_layers=n_layers or 2)
    raise ValueError(f"unknown shape {shape!r} (tiny, qwen3-30b-a3b)")


def _part(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'output_norm.weight' -> 'output_norm'."""
    pieces = name.split(".")
    return pieces[2] if pieces[0] == "blk" else pieces[0]


def q4_k_m_types(name: str) -> QT:
    """The Q4_K_M mix (as llama.cpp's quantizer makes it, without its per-layer variations): F32 for the
    norms and the router, Q6_K for attn_v, ffn_down_exps and output, Q4_K for everything else."""
    part = _part(name)
    if part in NORMS or part == "ffn_gate_inp":
        return QT.F32
    return QT.Q6_K if part in Q4_K_M_SIX else QT.Q4_K


def tensor_type(spec: SynthSpec, name: str) -> QT:
    """The GGML type of tensor `name` in a file of `spec`: norms and the router are always F32."""
    if spec.qtype == "Q4_K_M":
        return q4_k_m_types(name)
    part = _part(name)
    if part in NORMS or part == "ffn_gate_inp":
        return QT.F32
    return QT[spec.qtype]


def tensor_shapes(spec: SynthSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in file order -> numpy shape (rows, cols), experts (E, rows, cols)."""
    H, E, F, D = spec.hidden, spec.n_experts, spec.moe_ff, spec.head_dim
    q, kv = spec.n_heads * D, spec.n_kv_heads * D
    shapes = {"token_embd.weight": (spec.vocab_size, H), "output_norm.weight": (H,)}
    if not spec.tie_embeddings:
        shapes["output.weight"] = (spec.vocab_size, H)
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (H,),
            b + "attn_q.weight": (q, H),
            b + "attn_k.weight": (kv, H),
            b + "attn_v.weight": (kv, H),
            b + "attn_output.weight": (H, q),
            b + "attn_q_norm.weight": (D,),
            b + "attn_k_norm.weight": (D,),
            b + "ffn_norm.weight": (H,),
            b + "ffn_gate_inp.weight": (E, H),
            b + "ffn_gate_exps.weight": (E, F, H),
            b + "ffn_up_exps.weight": (E, F, H),
            b + "ffn_down_exps.weight": (E, H, F),
        })
    return shapes


def init_scale(spec: SynthSpec, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random weights of `name`: norms near 1; the embedding at 0.5 (rmsnorm follows);
    projections and the router at 1/sqrt(fan-in), so activations keep their scale through each matmul;
    q/k larger by qk_scale, which the q/k norms undo (without them the attention logits blow up)."""
    part = _part(name)
    if part in NORMS:
        return 1.0, 0.1
    if part == "token_embd":
        return 0.0, 0.5
    std = 1.0 / np.sqrt(shape[-1])
    if part in ("attn_q", "attn_k"):
        std *= spec.qk_scale
    return 0.0, float(std)


def tensor_rng(spec: SynthSpec, name: str) -> np.random.Generator:
    """The generator of one tensor's random weights: independent of every other tensor."""
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode())])


def _tensor_chunks(spec: SynthSpec, name: str, shape: tuple[int, ...], qt: QT,
                   given: np.ndarray | None) -> Iterator[np.ndarray]:
    """The raw bytes of one tensor as consecutive uint8 chunks of whole rows."""
    cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    step = max(1, CHUNK_ELEMS // cols)
    rng = tensor_rng(spec, name)
    mean, std = init_scale(spec, name, shape)
    rows = given.reshape(n_rows, cols) if given is not None else None
    for r0 in range(0, n_rows, step):
        n = min(step, n_rows - r0)
        if rows is not None:
            yield quantize(rows[r0:r0 + n], qt)
        elif spec.weights == "random_blocks" and qt != QT.F32:
            yield random_blocks(qt, (n, cols), rng, std=std)
        else:
            w = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std) + np.float32(mean)
            yield quantize(w, qt)


@functools.lru_cache(maxsize=4)
def _bpe_tokenizer(vocab_size: int):
    from .tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(_stdlib_sample(), vocab_size)


def _stdlib_sample(max_chars: int = 400_000) -> list[str]:
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
        if total >= max_chars:
            break
    return texts


def _spec_tokenizer(spec: SynthSpec):
    if spec.tokenizer == "bpe":
        return _bpe_tokenizer(spec.vocab_size)
    if spec.tokenizer == "synthetic":
        from .tokenizer import synthetic_vocab

        return synthetic_vocab(spec.vocab_size)
    return None


def _add_model_metadata(w, spec: SynthSpec) -> None:
    w.add_name(spec.name)
    w.add_file_type(FILE_TYPES[spec.qtype])
    w.add_quantization_version(2)  # GGML_QNT_VERSION
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.moe_ff)  # qwen3moe has no dense layers: llama.cpp only reads the expert width
    w.add_expert_feed_forward_length(spec.moe_ff)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    if spec.rope_theta is not None:
        w.add_rope_freq_base(spec.rope_theta)
    w.add_expert_count(spec.n_experts)
    w.add_expert_used_count(spec.n_experts_used)


def _add_tokenizer_metadata(w, tok, spec: SynthSpec) -> None:
    """tokenizer.ggml.* from TokenizerData.to_metadata(), each with the GGUF type llama.cpp writes."""
    from gguf import GGUFWriter

    typed = {
        "tokenizer.ggml.model": GGUFWriter.add_tokenizer_model,
        "tokenizer.ggml.pre": GGUFWriter.add_tokenizer_pre,
        "tokenizer.ggml.tokens": GGUFWriter.add_token_list,  # array of strings
        "tokenizer.ggml.merges": GGUFWriter.add_token_merges,  # array of strings
        "tokenizer.ggml.token_type": GGUFWriter.add_token_types,  # array of int32
        "tokenizer.ggml.eos_token_id": GGUFWriter.add_eos_token_id,  # uint32
        "tokenizer.ggml.bos_token_id": GGUFWriter.add_bos_token_id,
        "tokenizer.ggml.padding_token_id": GGUFWriter.add_pad_token_id,
        "tokenizer.ggml.add_bos_token": GGUFWriter.add_add_bos_token,  # bool
    }
    for key, value in tok.to_metadata().items():
        if key == "tokenizer.chat_template":
            continue  # the spec decides the template
        if key in typed:
            typed[key](w, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    template = spec.chat_template
    if template == "chatml":
        from .tokenizer import CHATML_TEMPLATE

        template = CHATML_TEMPLATE
    if template:
        w.add_chat_template(template)


def _check_given(tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    given = {}
    for name, arr in tensors.items():
        if name not in shapes:
            raise ValueError(f"tensor {name} is not part of this model (tied embeddings have no output.weight)")
        arr = np.asarray(arr, dtype=np.float32)
        if tuple(arr.shape) != shapes[name]:
            raise ValueError(f"tensor {name}: shape {tuple(arr.shape)} does not fit the spec {shapes[name]}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"tensor {name} holds NaN or infinite values")
        given[name] = arr
    return given


def write_model(path: str | os.PathLike, spec: SynthSpec, *, tensors: dict[str, np.ndarray] | None = None,
                tokenizer_data=None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete qwen3moe GGUF file for `spec`; returns its path.

    tensors: float32 arrays by GGUF name, numpy orientation (see tensor_shapes), replacing the random
      ones, e.g. a trained model's weights (the rest stay random). They are quantized to tensor_type().
    tokenizer_data: an engine.tokenizer.TokenizerData used instead of spec.tokenizer (e.g. a trained one);
      its size must be spec.vocab_size.
    progress: called as progress(bytes written, total bytes) while the tensor data is written.
    The file appears complete or not at all (written to `<path>.partial`, then renamed).
    """
    from gguf import GGUFWriter

    path = Path(path)
    shapes = tensor_shapes(spec)
    given = _check_given(tensors or {}, shapes)
    types = {name: tensor_type(spec, name) for name in shapes}
    byte_shapes = {}
    for name, shape in shapes.items():
        try:
            byte_shapes[name] = shape[:-1] + (row_bytes(types[name], shape[-1]),)
        except ValueError as e:
            raise ValueError(f"{name} {shape} as {types[name].name}: {e}") from None
    nbytes = {name: int(np.prod(bs, dtype=np.int64)) for name, bs in byte_shapes.items()}
    tok = tokenizer_data if tokenizer_data is not None else _spec_tokenizer(spec)
    if tok is not None and len(tok.tokens) != spec.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok.tokens)} tokens, the spec's vocab_size is {spec.vocab_size}")

    partial = path.with_name(path.name + ".partial")
    w = GGUFWriter(partial, arch=ARCH)  # opens the file at write_header_to_file
    try:
        _add_model_metadata(w, spec)
        if tok is not None:
            _add_tokenizer_metadata(w, tok, spec)
        for name in shapes:  # GGUFWriter turns the byte shape into the logical one and reverses it
            w.add_tensor_info(name, byte_shapes[name], np.dtype(np.uint8), nbytes[name], raw_dtype=types[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        # the data section: each tensor at the next multiple of the alignment, as the tensor infos say
        align = w.data_alignment
        total, done = sum(nbytes.values()), 0
        with open(partial, "ab") as f:
            f.write(bytes(-f.tell() % align))
            for name, shape in shapes.items():
                for chunk in _tensor_chunks(spec, name, shape, types[name], given.get(name)):
                    f.write(memoryview(np.ascontiguousarray(chunk).reshape(-1)))
                    done += chunk.nbytes
                    if progress is not None:
                        progress(done, total)
                f.write(bytes(-nbytes[name] % align))
        os.replace(partial, path)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    return path
