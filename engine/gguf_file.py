"""Opening a GGUF file: header checks, metadata as plain Python values, tensors as raw byte views.

The file is memory-mapped read-only. A tensor is exposed as a read-only uint8 view of its blocks,
shaped (rows, row_bytes) for matrices and (experts, rows, row_bytes) for expert stacks, so kernels
read the quantized bytes in place and the weights stay in the page cache.

Parsing is ours: `scan_header` walks the whole header once with `struct` over a read-only map, builds
the metadata values (gguf-py's `GGUFReader` gives the same values, in tests, but takes half a minute
over a real vocabulary) and checks what gguf-py would otherwise turn into an IndexError, a
reshape error, a silently short string, a recursion error or a hang (see shared/docs/robustness.md):
magic, version and byte order; n_kv and n_tensors against the file size; every key, string and array
length against the bytes left; value types; array nesting; general.alignment; per tensor: the name,
n_dims in 1..4, every dimension in 1..2^63-1, the element count below 2^63, a known type id, a row
length that is a whole number of blocks, an aligned offset, data inside the file and disjoint from
every other tensor's, and no duplicate names. Every failure is a GGUFFormatError (an unknown tensor
type id: UnsupportedTypeError) whose one-line message names the field and the value.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GGUFFormatError, UnsupportedTypeError
from .quants import block_layout, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2  # an array of arrays at most (ggml reads none; gguf-py flattens them)
DEFAULT_ALIGNMENT = 32
INT64_MAX = 2**63 - 1

# GGUFValueType ids -> (name, struct format of a scalar or None)
_VALUE_TYPES = {
    0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
    5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "B"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d"),
}
_STRING, _ARRAY, _UINT32, _BOOL = 8, 9, 4, 7
_SCALAR_SIZE = {t: struct.calcsize("<" + f) for t, (_, f) in _VALUE_TYPES.items() if f}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


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


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as the header describes it, checked: GGUF-order dims, type, offset into the data section."""

    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length
    qtype: int
    offset: int  # relative to the data section
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class Header:
    size: int
    version: int
    n_kv: int
    alignment: int
    data_start: int  # absolute offset of the (aligned) data section
    tensors: tuple[TensorEntry, ...]
    metadata: dict | None = None  # key -> value, when the scan was asked to build the values


def _short(text, limit: int = 80) -> str:
    """A name from the file, quoted for a one-line message (repr escapes newlines), cut at `limit`."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class _Cursor:
    """Reads little-endian fields from the mapped header; every read is checked against the file size."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, msg: str, error: type[Exception] = GGUFFormatError):
        return error(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at offset {self.pos} runs past the end of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        if n > self.size - self.pos:
            raise self.fail(f"{what} length {n} at offset {self.pos - 8} runs past the end of the file ({self.size} bytes)")
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def read_value(self, vtype: int, what: str, depth: int = 0):
        """One value of type `vtype` as gguf-py's `ReaderField.contents()` gives it: a Python scalar, a str,
        or a list (numeric arrays in one numpy step; string arrays in one pass). Same checks as skip_value."""
        if vtype in _SCALAR_SIZE:
            value = self.unpack("<" + _VALUE_TYPES[vtype][1], f"{what}: {_VALUE_TYPES[vtype][0]} value")
            return bool(value) if vtype == _BOOL else value
        if vtype == _STRING:
            return self._text(self.string(f"{what}: string"), what)
        if vtype != _ARRAY:
            raise self.fail(f"{what}: value type {vtype} at offset {self.pos - 4} is not a GGUF value type")
        sub, n = self._array_head(what, depth)
        if sub in _SCALAR_SIZE:
            values = np.frombuffer(self.buf, dtype="<" + _VALUE_TYPES[sub][1], count=n, offset=self.pos).tolist()
            self.pos += n * _SCALAR_SIZE[sub]
            return [bool(v) for v in values] if sub == _BOOL else values
        if sub == _STRING:
            return self._strings(n, what, build=True)
        return [self.read_value(sub, what, depth + 1) for _ in range(n)]

    def _array_head(self, what: str, depth: int) -> tuple[int, int]:
        """Element type and length of an array, checked: known type, nesting, and room for n elements."""
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep at offset {self.pos}")
        start = self.pos
        sub = self.u32(f"{what}: array element type")
        n = self.u64(f"{what}: array length")
        if sub not in _VALUE_TYPES:
            raise self.fail(f"{what}: array element type {sub} is not a GGUF value type")
        least = _SCALAR_SIZE.get(sub, 8 if sub == _STRING else 12)  # bytes per element, at least
        if n > (self.size - self.pos) // least:
            raise self.fail(f"{what}: array of {n} {_VALUE_TYPES[sub][0]} at offset {start} runs past the end "
                            f"of the file ({self.size} bytes)")
        return sub, n

    def _strings(self, n: int, what: str, build: bool) -> list[str] | None:
        """n length-prefixed strings in one tight pass, each length checked against the file."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}: string {i} length")
            length = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
            if length > size - pos:
                raise self.fail(f"{what}: string {i} length {length} at offset {pos - 8} runs past the end of "
                                f"the file ({size} bytes)")
            if build:
                out.append(self._text(buf[pos:pos + length], what))
            pos += length
        self.pos = pos
        return out if build else None

    def name(self, what: str, kind: str) -> str:
        """A key or a tensor name (`kind`): a length-prefixed string that must be UTF-8."""
        raw = self.string(f"{what}: {kind}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: {kind} {_short(raw)} is not valid UTF-8") from None

    def _text(self, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what}: a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        """Step over one value of type `vtype` (arrays: in O(1) for scalar elements, bounded by the file)."""
        if vtype in _SCALAR_SIZE:
            self.need(_SCALAR_SIZE[vtype], f"{what}: {_VALUE_TYPES[vtype][0]} value")
            self.pos += _SCALAR_SIZE[vtype]
        elif vtype == _STRING:
            n = self.u64(f"{what}: string length")
            if n > self.size - self.pos:
                raise self.fail(f"{what}: string length {n} at offset {self.pos - 8} runs past the end of the file "
                                f"({self.size} bytes)")
            self.pos += n
        elif vtype == _ARRAY:
            sub, n = self._array_head(what, depth)
            if sub in _SCALAR_SIZE:
                self.pos += n * _SCALAR_SIZE[sub]
            elif sub == _STRING:
                self._strings(n, what, build=False)
            else:
                for _ in range(n):
                    self.skip_value(sub, what, depth + 1)
        else:
            raise self.fail(f"{what}: value type {vtype} at offset {self.pos - 4} is not a GGUF value type")


def _check_header(path: Path) -> tuple[int, int]:
    """The fixed 24-byte header: file kind, magic, version, byte order and counts; returns (size, version)."""
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
            raise GGUFFormatError(f"{path}: big-endian GGUF files are not supported (magic b'FUGG')")
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", head[4:8])[0]
        if version & 0xFFFF == 0 and swapped in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{path}: big-endian GGUF files are not supported (version {swapped}, byte-swapped)")
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    left = size - 24
    if n_tensors > left // _MIN_TENSOR_INFO_BYTES:
        raise GGUFFormatError(f"{path}: header says n_tensors = {n_tensors}, impossible in {size} bytes")
    if n_kv > left // _MIN_KV_BYTES:
        raise GGUFFormatError(f"{path}: header says n_kv = {n_kv}, impossible in {size} bytes")
    return size, version


def scan_header(path: str | os.PathLike, *, values: bool = False) -> Header:
    """Walk and check the whole header (see the module doc); O(header) time. With `values`, also build
    the metadata (Header.metadata), each value only after its lengths were checked against the file.
    Raises GGUFFormatError / UnsupportedTypeError, one line each."""
    path = Path(path)
    size, version = _check_header(path)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _scan(buf, size, version, path, values)


def _scan(buf, size: int, version: int, path: Path, values: bool = False) -> Header:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf, size, path)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack("<QQ", "counts")
    alignment = DEFAULT_ALIGNMENT
    keys: dict[str, int] = {}
    metadata: dict = {}
    for i in range(n_kv):
        key = cur.name(f"kv {i}", "key")
        what = f"kv {i} {_short(key)}"
        if key in keys:
            raise cur.fail(f"duplicate key {_short(key)} (kv {keys[key]} and kv {i})")
        keys[key] = i
        vtype = cur.u32(f"{what}: value type")
        if vtype not in _VALUE_TYPES:
            raise cur.fail(f"{what}: value type {vtype} at offset {cur.pos - 4} is not a GGUF value type")
        value_at = cur.pos
        if values:
            metadata[key] = cur.read_value(vtype, what)
        else:
            cur.skip_value(vtype, what)
        if key == "general.alignment":
            if vtype != _UINT32:
                raise cur.fail(f"general.alignment has type {_VALUE_TYPES[vtype][0]}, expected UINT32")
            (alignment,) = struct.unpack_from("<I", buf, value_at)
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")

    entries: list[TensorEntry] = []
    names: dict[str, int] = {}
    for i in range(n_tensors):
        name = cur.name(f"tensor {i}", "name")
        what = f"tensor {i} {_short(name)}"
        if name in names:
            raise cur.fail(f"duplicate tensor name {_short(name)} (tensors {names[name]} and {i})")
        names[name] = i
        n_dims = cur.u32(f"{what}: n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{what}: n_dims {n_dims} is not in 1..{MAX_DIMS}")
        dims = cur.unpack(f"<{n_dims}Q", f"{what}: dims")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        n_elems = 1
        for j, d in enumerate(dims):
            if d == 0:
                raise cur.fail(f"{what}: dimension {j} is 0 (dims {list(dims)})")
            if d > INT64_MAX:
                raise cur.fail(f"{what}: dimension {j} is {d}, negative as int64")
            n_elems *= d
        if n_elems > INT64_MAX:
            raise cur.fail(f"{what}: dims {list(dims)} make {n_elems} elements, which overflows int64")
        qtype = cur.u32(f"{what}: type id")
        try:
            block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise cur.fail(f"{what}: unknown tensor type id {qtype}", UnsupportedTypeError) from None
        if dims[0] % block_elems:
            raise cur.fail(f"{what}: row length {dims[0]} is not a multiple of the {type_name(qtype)} "
                           f"block size {block_elems}")
        offset = cur.u64(f"{what}: data offset")
        if offset % alignment:
            raise cur.fail(f"{what}: data offset {offset} is not a multiple of the alignment {alignment}")
        entries.append(TensorEntry(name, dims, qtype, offset, n_elems // block_elems * block_bytes))

    data_start = -(-cur.pos // alignment) * alignment
    for t in entries:
        if data_start + t.offset + t.n_bytes > size:
            raise cur.fail(f"tensor {_short(t.name)}: {t.n_bytes} bytes of data at offset {t.offset} (file offset "
                           f"{data_start + t.offset}) run past the end of the file ({size} bytes)")
    ordered = sorted(entries, key=lambda t: t.offset)
    for prev, t in zip(ordered, ordered[1:]):
        if t.offset < prev.offset + prev.n_bytes:
            raise cur.fail(f"tensor {_short(t.name)} data [{t.offset}, {t.offset + t.n_bytes}) overlaps tensor "
                           f"{_short(prev.name)} [{prev.offset}, {prev.offset + prev.n_bytes})")
    return Header(size=size, version=version, n_kv=n_kv, alignment=alignment, data_start=data_start,
                  tensors=tuple(entries), metadata=metadata if values else None)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Map `path` and return its metadata and tensors; raises GGUFFormatError with a one-line message.

    The metadata comes from our own scan (gguf-py's GGUFReader builds a numpy view per string: about
    half a minute for a 151,936-token vocabulary); tests/engine/test_gguf_file.py checks it equals
    GGUFReader's on every fixture."""
    path = Path(path)
    header = scan_header(path, values=True)
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith("GGUF.")}
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise GGUFFormatError(f"{path}: cannot map the file ({_one_line(exc)})") from None
    tensors: dict[str, TensorInfo] = {}
    for t in header.tensors:
        elems, nbytes = block_layout(t.qtype)
        row_bytes = t.dims[0] // elems * nbytes
        start = header.data_start + t.offset
        # a plain read-only ndarray over the map (its base keeps the map open): the kernels take it as is
        raw = data[start : start + t.n_bytes].reshape(t.shape[:-1] + (row_bytes,)).view(np.ndarray)
        raw.flags.writeable = False
        tensors[t.name] = TensorInfo(t.name, t.qtype, t.shape, raw)
    return GGUFFile(path=path, size=header.size, version=header.version, metadata=metadata, tensors=tensors)


def _one_line(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
