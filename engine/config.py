"""The qwen3_moe model configuration, read from `qwen3moe.*` GGUF metadata.

Every field records where its value came from: the file, a default, or a knob the user turned.
Defaults are visible on purpose (architecture.md, principle 4): upstream silently used a rope theta
of 10,000 when the key was absent, and that broke every position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ModelValidationError

ARCH = "qwen3moe"
DEFAULT_ROPE_THETA = 1_000_000.0  # right for qwen3moe; llama.cpp falls back to 10,000
DEFAULT_RMS_EPS = 1e-6

TEMPLATE_CHOICES = ("auto", "chatml", "qwen3-nothink", "raw")

# Where the one forward pass runs (engine/backend.py): float32 on the CPU, the CPU with 8-bit activations
# for single-token products (an explicit fast mode, engine/kernels/cpu_q8.py), or an NVIDIA GPU.
BACKENDS = ("cpu", "cpu-q8", "cuda")
BACKEND_HELP = ("Where the forward runs: the CPU (Numba, float32), the CPU with 8-bit activations for decode "
                "steps (cpu-q8: faster, llama.cpp-like rounding), or an NVIDIA GPU (numba-cuda).")


@dataclass(frozen=True)
class Knobs:
    """Switches that reproduce the upstream bugs. The defaults are the correct model.

    qk_norm=False        skip the per-head Q/K RMSNorm (layer std grew ~40x, output '%%%%')
    rope_theta=<value>   override the file's rope base (upstream defaulted to 10,000)
    norm_topk_prob=False do not renormalise the k routing weights to sum 1
    template=<choice>    chat template: auto | chatml | qwen3-nothink | raw
    """

    qk_norm: bool = True
    rope_theta: float | None = None
    norm_topk_prob: bool = True
    template: str = "auto"

    def __post_init__(self):
        if self.rope_theta is not None and not (self.rope_theta > 0 and self.rope_theta < float("inf")):
            raise ModelValidationError(f"rope_theta must be a positive finite number, got {self.rope_theta}")
        if self.template not in TEMPLATE_CHOICES:
            raise ModelValidationError(f"template must be one of {', '.join(TEMPLATE_CHOICES)}, got {self.template!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def changed(self) -> dict:
        """Only the knobs that differ from the correct model."""
        default = Knobs()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of one qwen3_moe model. `sources[name]` is 'file' or 'default'."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    moe_ff: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    norm_topk_prob: bool
    tie_embeddings: bool
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def defaults_used(self) -> list[str]:
        return sorted(k for k, v in self.sources.items() if v == "default")

    def to_dict(self) -> dict:
        return asdict(self)


def _get(md: dict, key: str, kind, *, default=None, sources: dict, name: str):
    full = f"{ARCH}.{key}"
    if full not in md or md[full] is None:
        if default is None:
            raise ModelValidationError(f"metadata key {full} is missing")
        sources[name] = "default"
        return default
    value = md[full]
    if isinstance(value, list) or isinstance(value, (str, bytes)):
        raise ModelValidationError(f"metadata key {full} should be a number, got {type(value).__name__}")
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelValidationError(f"metadata key {full} has an unusable value {value!r}") from None
    sources[name] = "file"
    return value


def config_from_metadata(md: dict, *, vocab_size: int, tie_embeddings: bool) -> ModelConfig:
    """Build the config; `vocab_size` and `tie_embeddings` come from the tensors (token_embd rows, output.weight)."""
    arch = md.get("general.architecture")
    if arch != ARCH:
        raise ModelValidationError(f"general.architecture is {arch!r}; this workbench runs {ARCH!r} models")
    src: dict[str, str] = {}
    n_layers = _get(md, "block_count", int, sources=src, name="n_layers")
    hidden = _get(md, "embedding_length", int, sources=src, name="hidden")
    n_heads = _get(md, "attention.head_count", int, sources=src, name="n_heads")
    n_kv_heads = _get(md, "attention.head_count_kv", int, default=n_heads, sources=src, name="n_kv_heads")
    if n_heads <= 0:
        raise ModelValidationError(f"{ARCH}.attention.head_count must be positive, got {n_heads}")
    head_dim = _get(
        md, "attention.key_length", int, default=hidden // n_heads, sources=src, name="head_dim"
    )
    value_length = md.get(f"{ARCH}.attention.value_length", head_dim)
    n_experts = _get(md, "expert_count", int, sources=src, name="n_experts")
    n_used = _get(md, "expert_used_count", int, sources=src, name="n_experts_used")
    moe_ff = _get(md, "expert_feed_forward_length", int, sources=src, name="moe_ff")
    context_length = _get(md, "context_length", int, default=4096, sources=src, name="context_length")
    rope_theta = _get(md, "rope.freq_base", float, default=DEFAULT_ROPE_THETA, sources=src, name="rope_theta")
    rms_eps = _get(
        md, "attention.layer_norm_rms_epsilon", float, default=DEFAULT_RMS_EPS, sources=src, name="rms_eps"
    )
    # qwen3moe GGUFs carry no norm_topk_prob key: Qwen3-MoE always renormalises (HF config: true).
    src["norm_topk_prob"] = "default"
    src["vocab_size"] = "file"
    src["tie_embeddings"] = "file"

    for name, value in (("block_count", n_layers), ("embedding_length", hidden), ("attention.key_length", head_dim),
                        ("expert_count", n_experts), ("expert_used_count", n_used),
                        ("expert_feed_forward_length", moe_ff), ("context_length", context_length)):
        if value <= 0:
            raise ModelValidationError(f"{ARCH}.{name} must be positive, got {value}")
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ModelValidationError(
            f"{ARCH}.attention.head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
        )
    if value_length != head_dim:
        raise ModelValidationError(
            f"{ARCH}.attention.value_length {value_length} differs from key_length {head_dim}; not supported"
        )
    if head_dim % 2:
        raise ModelValidationError(f"{ARCH}.attention.key_length {head_dim} must be even for RoPE")
    if n_used > n_experts:
        raise ModelValidationError(f"{ARCH}.expert_used_count {n_used} exceeds expert_count {n_experts}")
    if not (rope_theta > 0 and rope_theta < float("inf")):
        raise ModelValidationError(f"{ARCH}.rope.freq_base must be positive and finite, got {rope_theta}")
    if not (rms_eps > 0 and rms_eps < 1):
        raise ModelValidationError(f"{ARCH}.attention.layer_norm_rms_epsilon out of range: {rms_eps}")
    return ModelConfig(
        n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        n_experts=n_experts, n_experts_used=n_used, moe_ff=moe_ff, vocab_size=vocab_size,
        context_length=context_length, rope_theta=rope_theta, rms_eps=rms_eps, norm_topk_prob=True,
        tie_embeddings=tie_embeddings, sources=src,
    )
