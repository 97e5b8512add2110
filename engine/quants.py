"""Block layouts of the GGML quantization types, written as sums of their parts.

A GGUF row of `n` elements of type T occupies `n // block_elems * block_bytes` bytes; rows are
contiguous. Layouts follow ggml's `ggml-common.h` (read, not copied):

    Q8_0: d:f16, qs:int8[32]
    Q4_K: d:f16, dmin:f16, scales:u8[12] (8 six-bit scales + 8 six-bit mins), qs:u8[128] (nibbles)
    Q5_K: d:f16, dmin:f16, scales:u8[12], qh:u8[32] (5th bits), qs:u8[128]
    Q6_K: ql:u8[128] (low nibbles), qh:u8[64] (high 2 bits), scales:i8[16], d:f16
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

QK_K = 256

# (elements per block, bytes per block) for the types with fast fused kernels.
BLOCK_LAYOUT: dict[QT, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q8_0: (32, 2 + 32),
    QT.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    QT.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    QT.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}

FAST_TYPES: frozenset[QT] = frozenset(BLOCK_LAYOUT)


def block_layout(qtype: int) -> tuple[int, int]:
    """(elements, bytes) of one block of `qtype`; any type gguf-py knows."""
    try:
        qt = QT(qtype)
    except ValueError:
        from .errors import UnsupportedTypeError

        raise UnsupportedTypeError(f"unknown tensor type id {qtype}") from None
    if qt in BLOCK_LAYOUT:
        return BLOCK_LAYOUT[qt]
    return GGML_QUANT_SIZES[qt]


def row_bytes(qtype: int, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; raises ValueError when n_cols is not a whole number of blocks."""
    elems, nbytes = block_layout(qtype)
    if n_cols % elems:
        raise ValueError(f"row length {n_cols} is not a multiple of the {QT(qtype).name} block size {elems}")
    return n_cols // elems * nbytes


def type_name(qtype: int) -> str:
    try:
        return QT(qtype).name
    except ValueError:
        return f"unknown type {qtype}"


def readable(qtype: int) -> bool:
    """True when a fast kernel or gguf-py's row-wise dequantize can read `qtype`."""
    try:
        qt = QT(qtype)
    except ValueError:
        return False
    if qt in FAST_TYPES:
        return True
    from gguf import quants as gq

    return qt in getattr(gq, "_type_traits", {})
