"""Kernels the forward pass calls: quantized matmuls over raw GGUF blocks, the embedding lookup and
activation statistics. The CPU (Numba) implementation is `engine.kernels.cpu`."""

from .cpu import (STAT_FIELDS, activation_stats, dequantize_rows, expert_matmul, get_rows, matmul, matvec,
                  softmax_parts)

__all__ = ["STAT_FIELDS", "activation_stats", "dequantize_rows", "expert_matmul", "get_rows", "matmul", "matvec",
           "softmax_parts"]
