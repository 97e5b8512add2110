"""Kernels the forward pass calls. The CPU (Numba) implementation is `engine.kernels.cpu`."""

from .cpu import (  # noqa: F401
    STAT_FIELDS,
    activation_stats,
    dequantize_rows,
    expert_matmul,
    get_rows,
    matmul,
    matvec,
)
