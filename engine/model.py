"""A loaded qwen3_moe model: config, quantized weights (views into the mapped file), tokenizer.

`load_model(path)` validates everything before any kernel runs: architecture, every required
tensor present, every shape consistent with the metadata, every type readable, head and expert
counts coherent, the tokenizer arrays. The weights are never dequantized whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import CPU, create_backend
from .config import ModelConfig, config_from_metadata
from .errors import ModelValidationError, UnsupportedTypeError
from .gguf_file import GGUFFile, TensorInfo, open_gguf
from .quants import FAST_TYPES, readable, type_name

# GGUF tensor names, as templates (gguf-py's TENSOR_NAMES spell them the same way).
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"
LAYER_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
    "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
)


def layer_tensor_name(layer: int, part: str) -> str:
    return f"blk.{layer}.{part}.weight"


@dataclass(frozen=True)
class QTensor:
    """A weight as stored: GGML type, logical shape (numpy order) and the raw block bytes."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def fast(self) -> bool:
        return self.qtype in FAST_TYPES

    @classmethod
    def from_info(cls, t: TensorInfo) -> "QTensor":
        return cls(t.name, t.qtype, t.shape, t.raw)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray    # f32 (hidden,)
    attn_q: QTensor          # (n_heads*head_dim, hidden)
    attn_k: QTensor          # (n_kv*head_dim, hidden)
    attn_v: QTensor          # (n_kv*head_dim, hidden)
    attn_output: QTensor     # (hidden, n_heads*head_dim)
    attn_q_norm: np.ndarray  # f32 (head_dim,)
    attn_k_norm: np.ndarray  # f32 (head_dim,)
    ffn_norm: np.ndarray     # f32 (hidden,)
    ffn_gate_inp: QTensor    # router (n_experts, hidden)
    ffn_gate_exps: QTensor   # (E, moe_ff, hidden)
    ffn_up_exps: QTensor     # (E, moe_ff, hidden)
    ffn_down_exps: QTensor   # (E, hidden, moe_ff)


@dataclass
class Model:
    path: Path
    config: ModelConfig
    metadata: dict
    token_embd: QTensor      # (vocab, hidden)
    output_norm: np.ndarray  # f32 (hidden,)
    output: QTensor          # (vocab, hidden); token_embd when the file ties them
    layers: list[LayerWeights]
    tokenizer: object | None  # engine.tokenizer.Tokenizer, or None when the file has no tokenizer
    file_size: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    backend: object = CPU  # engine.backend: where the forward runs (CPU, or a CudaBackend holding device weights)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


def _small_f32(t: TensorInfo) -> np.ndarray:
    """Dequantize a small 1-D tensor (norm weights) to float32."""
    from .kernels import dequantize_rows

    return np.ascontiguousarray(dequantize_rows(t.qtype, t.raw.reshape(1, -1), t.shape[-1])[0], dtype=np.float32)


def _expect(f: GGUFFile, name: str, shape: tuple[int, ...]) -> TensorInfo:
    t = f.tensors.get(name)
    if t is None:
        raise ModelValidationError(f"{f.path.name}: required tensor {name} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ModelValidationError(
            f"{f.path.name}: tensor {name} has shape {list(t.shape)}, the metadata implies {list(shape)}"
        )
    if not readable(t.qtype):
        raise UnsupportedTypeError(f"{f.path.name}: tensor {name} has type {type_name(t.qtype)}, which no path reads")
    return t


def load_model(path: str | os.PathLike, *, with_tokenizer: bool = True, backend: str = "cpu",
               progress=None) -> Model:
    """Open, validate and map a qwen3_moe GGUF file, to run on `backend` (one of engine.config.BACKENDS: 'cpu', 'cpu-q8', 'cuda').

    With 'cuda' the quantized blocks are copied to the GPU once, as they are in the file;
    progress(done_bytes, total_bytes) follows the copy. BackendUnavailable when the backend cannot run here.
    """
    f = open_gguf(path)
    md = f.metadata
    if md.get("general.architecture") != "qwen3moe":
        raise ModelValidationError(
            f"{f.path.name}: general.architecture is {md.get('general.architecture')!r}; this workbench runs 'qwen3moe' models"
        )
    emb = f.tensors.get(TOKEN_EMBD)
    if emb is None:
        raise ModelValidationError(f"{f.path.name}: required tensor {TOKEN_EMBD} is missing")
    if len(emb.shape) != 2:
        raise ModelValidationError(f"{f.path.name}: tensor {TOKEN_EMBD} should be 2-D, has shape {list(emb.shape)}")
    vocab = emb.shape[0]
    tied = OUTPUT not in f.tensors
    cfg = config_from_metadata(md, vocab_size=vocab, tie_embeddings=tied)
    H, E, F = cfg.hidden, cfg.n_experts, cfg.moe_ff
    token_embd = _expect(f, TOKEN_EMBD, (vocab, H))
    output = token_embd if tied else _expect(f, OUTPUT, (vocab, H))
    output_norm = _expect(f, OUTPUT_NORM, (H,))
    shapes = {
        "attn_norm": (H,), "attn_q": (cfg.q_dim, H), "attn_k": (cfg.kv_dim, H), "attn_v": (cfg.kv_dim, H),
        "attn_output": (H, cfg.q_dim), "attn_q_norm": (cfg.head_dim,), "attn_k_norm": (cfg.head_dim,),
        "ffn_norm": (H,), "ffn_gate_inp": (E, H), "ffn_gate_exps": (E, F, H), "ffn_up_exps": (E, F, H),
        "ffn_down_exps": (E, H, F),
    }
    layers = []
    for i in range(cfg.n_layers):
        ts = {p: _expect(f, layer_tensor_name(i, p), shapes[p]) for p in LAYER_TENSORS}
        layers.append(
            LayerWeights(
                attn_norm=_small_f32(ts["attn_norm"]),
                attn_q=QTensor.from_info(ts["attn_q"]),
                attn_k=QTensor.from_info(ts["attn_k"]),
                attn_v=QTensor.from_info(ts["attn_v"]),
                attn_output=QTensor.from_info(ts["attn_output"]),
                attn_q_norm=_small_f32(ts["attn_q_norm"]),
                attn_k_norm=_small_f32(ts["attn_k_norm"]),
                ffn_norm=_small_f32(ts["ffn_norm"]),
                ffn_gate_inp=QTensor.from_info(ts["ffn_gate_inp"]),
                ffn_gate_exps=QTensor.from_info(ts["ffn_gate_exps"]),
                ffn_up_exps=QTensor.from_info(ts["ffn_up_exps"]),
                ffn_down_exps=QTensor.from_info(ts["ffn_down_exps"]),
            )
        )
    tokenizer = None
    if with_tokenizer and "tokenizer.ggml.tokens" in md:
        from .tokenizer import Tokenizer, TokenizerData

        data = TokenizerData.from_metadata(md)
        if len(data.tokens) != vocab:
            raise ModelValidationError(
                f"{f.path.name}: tokenizer has {len(data.tokens)} tokens but {TOKEN_EMBD} has {vocab} rows"
            )
        tokenizer = Tokenizer.from_data(data)
    embd = QTensor.from_info(token_embd)
    model = Model(
        path=f.path, config=cfg, metadata=md, token_embd=embd,
        output_norm=_small_f32(output_norm), output=embd if tied else QTensor.from_info(output), layers=layers,
        tokenizer=tokenizer, file_size=f.size, tensor_types={n: t.type_name for n, t in f.tensors.items()},
    )
    model.backend = create_backend(backend, model, progress)
    return model
