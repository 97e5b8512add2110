"""Opening a GGUF file: header checks, metadata as plain Python values, tensors as raw byte views.

The file is memory-mapped read-only. A tensor is exposed as a read-only uint8 view of its blocks,
shaped (rows, row_bytes) for matrices and (experts, rows, row_bytes) for expert stacks, so kernels
read the quantized bytes in place and the weights stay in the page cache.

Parsing is gguf-py's `GGUFReader`; in front of it we check what it would otherwise turn into an
IndexError, a reshape error or a hang (see shared/docs/robustness.md), and wrap what is left.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GGUFFormatError, UnsupportedTypeError
from .quants import block_layout, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is numpy order (outermost first): (rows, cols) or (E, rows, cols)."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8, shape[:-1] + (row_bytes,), read-only view into the memory map

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)

    @property
    def n_bytes(self) -> int:
        return int(self.raw.nbytes)


@dataclass
class GGUFFile:
    path: Path
    size: int
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]


def _check_header(path: Path) -> tuple[int, int]:
    if not path.exists():
        raise GGUFFormatError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFFormatError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{path}: not a GGUF file (only {size} bytes; a GGUF header alone is 24)")
    with path.open("rb") as fh:
        head = fh.read(24)
    magic = head[:4]
    if magic != GGUF_MAGIC:
        if magic == b"FUGG":
            raise GGUFFormatError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    # every tensor info takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes, every kv at least 8 + 1 + 4 + 1
    if n_tensors > size // 33:
        raise GGUFFormatError(f"{path}: header says n_tensors = {n_tensors}, impossible in {size} bytes")
    if n_kv > size // 14:
        raise GGUFFormatError(f"{path}: header says n_kv = {n_kv}, impossible in {size} bytes")
    return size, version


def _field_value(field):
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Map `path` and return its metadata and tensors; raises GGUFFormatError with a one-line message."""
    from gguf import GGUFReader

    path = Path(path)
    size, version = _check_header(path)
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, OverflowError, struct.error, KeyError) as exc:
        raise GGUFFormatError(f"{path}: malformed GGUF ({type(exc).__name__}: {exc})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(field)
    data = reader.data
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if any(d <= 0 for d in shape):
            raise GGUFFormatError(f"{path}: tensor {t.name} has a non-positive dimension {shape}")
        try:
            elems, nbytes = block_layout(qtype)
        except (KeyError, ValueError):
            raise UnsupportedTypeError(f"{path}: tensor {t.name} has unknown type id {qtype}") from None
        if shape[-1] % elems:
            raise GGUFFormatError(
                f"{path}: tensor {t.name} row length {shape[-1]} is not a multiple of the "
                f"{type_name(qtype)} block size {elems}"
            )
        row_bytes = shape[-1] // elems * nbytes
        total = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        start = int(t.data_offset)
        if start < 0 or start + total > size:
            raise GGUFFormatError(
                f"{path}: tensor {t.name} data [{start}, {start + total}) lies past the end of the file ({size} bytes)"
            )
        raw = data[start : start + total].reshape(shape[:-1] + (row_bytes,))
        tensors[t.name] = TensorInfo(t.name, qtype, shape, raw)
    return GGUFFile(path=path, size=size, version=version, metadata=metadata, tensors=tensors)
