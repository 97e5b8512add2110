"""Test utility: GGUF files written byte by byte (v3, little-endian), so a test can break any field.

gguf-py's writer refuses most of the faults the malformed-file corpus needs (it will not write a
version 99, an n_dims of 5 or an offset past the end), so the corpus is built here with `struct`.

    spec = GGUFSpec()                          # a small well-formed file: 3 kv, 2 F32 tensors
    spec.kvs[0] = KV("general.architecture", STRING, "llama")
    spec.tensors[1].offset = 32                # overlaps tensor 0
    data = spec.build()

Every part can be overridden with raw bytes (`KV.raw_value`, `GGUFSpec.n_kv`, ...), and `layout()`
gives the offsets of the parts, so a test can truncate or patch the file at a known place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUFValueType ids
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
           UINT64: "Q", INT64: "q", FLOAT64: "d"}
F32, F16, Q8_0 = 0, 1, 8


def gguf_string(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def value_bytes(vtype: int, value) -> bytes:
    """The encoding of a value of type `vtype` (without the type id); arrays: value = (sub_type, items)."""
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        sub, items = value
        return struct.pack("<IQ", sub, len(items)) + b"".join(value_bytes(sub, v) for v in items)
    return struct.pack("<" + _SCALAR[vtype], value)


def nested_array(depth: int, innermost=(UINT8, [1])) -> tuple[int, tuple]:
    """(ARRAY, value) of arrays nested `depth` deep, the innermost holding `innermost`."""
    value = innermost
    for _ in range(depth - 1):
        value = (ARRAY, [value])
    return ARRAY, value


@dataclass
class KV:
    key: str | bytes
    vtype: int
    value: object = None
    raw_value: bytes | None = None  # written after the type id instead of value_bytes(vtype, value)
    key_length: int | None = None  # a lie about the key's length

    def build(self) -> bytes:
        body = self.raw_value if self.raw_value is not None else value_bytes(self.vtype, self.value)
        return gguf_string(self.key, self.key_length) + struct.pack("<I", self.vtype) + body


@dataclass
class Tensor:
    name: str | bytes
    dims: list[int]  # GGUF order: dims[0] is the row length
    qtype: int = F32
    offset: int = 0
    n_dims: int | None = None  # a lie about the number of dims
    name_length: int | None = None

    def build(self) -> bytes:
        n = len(self.dims) if self.n_dims is None else self.n_dims
        return (gguf_string(self.name, self.name_length) + struct.pack("<I", n)
                + b"".join(struct.pack("<Q", d) for d in self.dims) + struct.pack("<IQ", self.qtype, self.offset))


def _default_kvs() -> list[KV]:
    return [
        KV("general.architecture", STRING, "qwen3moe"),
        KV("general.name", STRING, "corpus"),
        KV("test.ids", ARRAY, (UINT32, [1, 2, 3])),
    ]


def _default_tensors() -> list[Tensor]:
    return [Tensor("a.weight", [8, 2], F32, 0), Tensor("b.weight", [8], F32, 64)]


@dataclass
class GGUFSpec:
    magic: bytes = b"GGUF"
    version: int = 3
    kvs: list[KV] = field(default_factory=_default_kvs)
    tensors: list[Tensor] = field(default_factory=_default_tensors)
    n_tensors: int | None = None  # a lie about the counts
    n_kv: int | None = None
    alignment: int = 32  # only used to place the data section; set general.alignment in kvs to change it
    data: bytes | None = None  # the tensor data section; default: exactly what the tensors need, counting up

    def header(self) -> bytes:
        n_t = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        return self.magic + struct.pack("<IQQ", self.version, n_t, n_kv)

    def layout(self) -> dict:
        """Offsets: 'kv' (start of the kv section), 'tensor_info', 'data' (aligned start of the data)."""
        head = self.header()
        kv = b"".join(k.build() for k in self.kvs)
        ti = b"".join(t.build() for t in self.tensors)
        end = len(head) + len(kv) + len(ti)
        data = -(-end // self.alignment) * self.alignment
        return {"kv": len(head), "tensor_info": len(head) + len(kv), "info_end": end, "data": data}

    def data_size(self) -> int:
        ends = [t.offset + _nbytes(t) for t in self.tensors if t.qtype == F32 and all(0 < d < 2**20 for d in t.dims)]
        return max(ends, default=0)

    def build(self) -> bytes:
        head = self.header() + b"".join(k.build() for k in self.kvs) + b"".join(t.build() for t in self.tensors)
        lay = self.layout()
        head += b"\0" * (lay["data"] - len(head))
        data = self.data if self.data is not None else bytes(i % 251 for i in range(self.data_size()))
        return head + data


def _nbytes(t: Tensor) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * 4
