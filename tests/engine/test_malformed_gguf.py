"""The malformed-GGUF corpus (shared/docs/robustness.md, items 1-3), built byte by byte by the tests.

Each case is a small hand-made GGUF v3 file with one fault. Loading it through the engine's entry
point (`engine.model.load_model`, which opens the file with `engine.gguf_file.open_gguf`) must raise
the engine's typed error with a one-line message naming the field and its value, in well under a
second, without allocating more than a few MB (tracemalloc sees numpy's buffers too) and without a
hang (an interval timer turns one into a failure). Then hypothesis mutates and truncates headers at
random: only a typed error or success is allowed.
"""

from __future__ import annotations

import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import GGUFFormatError, UnsupportedTypeError, WorkbenchError
from engine.gguf_file import open_gguf
from engine.model import load_model
from tests.gguf_bytes import (ARRAY, F32, INT32, KV, Q8_0, STRING, UINT8, UINT32, GGUFSpec, Tensor, gguf_string,
                              nested_array)

HEADER_SECONDS = 1.0
PEAK_BYTES = 32 * 2**20
BIG63, BIG62 = 2**63, 2**62


@contextmanager
def watchdog(seconds: float = 10.0):
    """A hang becomes a TimeoutError (SIGALRM) instead of a stuck test run."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_fails(path: Path, error: type[Exception] = GGUFFormatError, *fragments: str) -> str:
    """load_model(path) raises `error`, quickly and without a big allocation; returns the message."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with watchdog(), pytest.raises(WorkbenchError) as info:
            load_model(path)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert isinstance(info.value, error), repr(info.value)
    msg = str(info.value)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert elapsed < HEADER_SECONDS, f"{elapsed:.2f} s: {msg}"
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.1f} MiB: {msg}"
    return msg


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def valid() -> GGUFSpec:
    return GGUFSpec()


def with_kv(spec: GGUFSpec, index: int, kv: KV) -> GGUFSpec:
    spec.kvs[index] = kv
    return spec


def with_tensor(spec: GGUFSpec, index: int, **changes) -> GGUFSpec:
    for k, v in changes.items():
        setattr(spec.tensors[index], k, v)
    return spec


def test_the_corpus_base_file_is_valid(tmp_path):
    """Every case below breaks one thing in this file, which opens cleanly."""
    f = open_gguf(write(tmp_path, valid().build()))
    assert f.metadata == {"general.architecture": "qwen3moe", "general.name": "corpus", "test.ids": [1, 2, 3]}
    assert {n: t.shape for n, t in f.tensors.items()} == {"a.weight": (2, 8), "b.weight": (8,)}
    assert f.tensors["b.weight"].raw[0] == 64 % 251  # the data section starts where the offsets say
    # and its only fault for load_model is that it is not a model
    with pytest.raises(WorkbenchError, match="required tensor token_embd.weight is missing"):
        load_model(write(tmp_path, valid().build()))


# --- 1. files ----------------------------------------------------------------------------------------


def _truncate_at(part: str, delta: int, first: KV | None = None):
    """The base file cut at `delta` bytes from the start of `part`; `first`: a kv put in front of the others."""

    def make():
        s = valid()
        if first is not None:
            s.kvs.insert(0, first)
        return s.build()[: s.layout()[part] + delta]

    return make


FILE_CASES = {
    "empty": (lambda: b"", ["0 bytes"]),
    "3-bytes": (lambda: b"GGU", ["3 bytes"]),
    "header-only-20-bytes": (lambda: valid().build()[:20], ["20 bytes"]),
    "bad-magic": (lambda: GGUFSpec(magic=b"GGML").build(), ["magic", "GGML"]),
    "zip-file": (lambda: b"PK\x03\x04" + b"\0" * 100, ["magic", "PK"]),
    "big-endian-magic": (lambda: GGUFSpec(magic=b"FUGG").build(), ["big-endian"]),
    "big-endian-version": (lambda: b"GGUF" + struct.pack(">IQQ", 3, 2, 3) + valid().build()[24:], ["big-endian"]),
    "version-0": (lambda: GGUFSpec(version=0).build(), ["version 0"]),
    "version-1": (lambda: GGUFSpec(version=1).build(), ["version 1"]),
    "version-99": (lambda: GGUFSpec(version=99).build(), ["version 99"]),
    "truncated-after-the-counts": (_truncate_at("kv", 12), ["n_tensors = 2", "impossible in 36 bytes"]),
    "truncated-in-a-key": (_truncate_at("kv", 100, KV("k" * 300, UINT8, 1)),
                           ["kv 0: key length 300", "past the end", "124 bytes"]),
    "truncated-in-a-string-value": (_truncate_at("kv", 100, KV("general.long", STRING, "x" * 400)),
                                    ["kv 0 'general.long'", "string length 400", "past the end"]),
    "truncated-in-kv-section": (_truncate_at("tensor_info", -3), ["test.ids", "past the end"]),
    "truncated-in-tensor-info": (_truncate_at("tensor_info", 20), ["tensor 0", "past the end"]),
    "truncated-before-data": (_truncate_at("info_end", 0), ["a.weight", "past the end"]),
    "truncated-in-tensor-data": (_truncate_at("data", 10), ["a.weight", "past the end"]),
    "one-byte-short": (lambda: valid().build()[:-1], ["b.weight", "past the end", "351 bytes"]),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_file(tmp_path, case):
    make, fragments = FILE_CASES[case]
    load_fails(write(tmp_path, make()), GGUFFormatError, *fragments)


def test_missing_file_and_directory(tmp_path):
    load_fails(tmp_path / "absent.gguf", GGUFFormatError, "no such file")
    load_fails(tmp_path, GGUFFormatError, "not a regular file")


# --- 2. header counts, lengths, arrays ---------------------------------------------------------------


def _string_array_2_63():
    return with_kv(valid(), 2, KV("test.ids", ARRAY, raw_value=struct.pack("<IQ", STRING, BIG63) + gguf_string("x")))


def _deep_raw(depth: int) -> bytes:
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQB", UINT8, 1, 7)


COUNT_CASES = {
    "n_tensors-2^63": (lambda: GGUFSpec(n_tensors=BIG63), GGUFFormatError, ["n_tensors", str(BIG63)]),
    "n_kv-2^63": (lambda: GGUFSpec(n_kv=BIG63), GGUFFormatError, ["n_kv", str(BIG63)]),
    "n_tensors-2^64-1": (lambda: GGUFSpec(n_tensors=2**64 - 1), GGUFFormatError, ["n_tensors", str(2**64 - 1)]),
    "n_kv-more-than-present": (lambda: GGUFSpec(n_kv=5), GGUFFormatError, []),
    "n_tensors-more-than-present": (lambda: GGUFSpec(n_tensors=4), GGUFFormatError, []),
    "key-length-2^62": (lambda: with_kv(valid(), 0, KV("general.architecture", STRING, "qwen3moe", key_length=BIG62)),
                        GGUFFormatError, ["key", str(BIG62)]),
    "string-length-2^62": (lambda: with_kv(valid(), 1, KV("general.name", STRING, raw_value=gguf_string("x", BIG62))),
                           GGUFFormatError, ["general.name", str(BIG62)]),
    "tensor-name-length-2^62": (lambda: with_tensor(valid(), 1, name_length=BIG62), GGUFFormatError,
                                ["tensor 1", "name", str(BIG62)]),
    "array-2^63-long": (lambda: with_kv(valid(), 2, KV("test.ids", ARRAY, raw_value=struct.pack("<IQ", UINT32, BIG63))),
                        GGUFFormatError, ["test.ids", str(BIG63)]),
    "string-array-2^63-long": (_string_array_2_63, GGUFFormatError, ["test.ids", str(BIG63)]),
    "array-nested-64-deep": (lambda: with_kv(valid(), 2, KV("test.ids", *nested_array(64))), GGUFFormatError,
                             ["test.ids", "nested"]),
    "array-nested-100000-deep": (lambda: with_kv(valid(), 2, KV("test.ids", ARRAY, raw_value=_deep_raw(100_000))),
                                 GGUFFormatError, ["test.ids", "nested"]),
    "unknown-value-type": (lambda: with_kv(valid(), 2, KV("test.ids", 99, raw_value=b"\0" * 8)), GGUFFormatError,
                           ["test.ids", "value type 99"]),
    "unknown-array-element-type": (
        lambda: with_kv(valid(), 2, KV("test.ids", ARRAY, raw_value=struct.pack("<IQ", 77, 1) + b"\0" * 8)),
        GGUFFormatError, ["test.ids", "type 77"]),
    "duplicate-key": (lambda: with_kv(valid(), 2, KV("general.name", STRING, "twice")), GGUFFormatError,
                      ["duplicate", "general.name"]),
    "key-not-utf8": (lambda: with_kv(valid(), 1, KV(b"general.\xff\xfe", STRING, "x")), GGUFFormatError,
                     ["key", "UTF-8"]),
    "string-value-not-utf8": (lambda: with_kv(valid(), 1, KV("general.name", STRING, raw_value=gguf_string(b"\xff\xfe"))),
                              GGUFFormatError, ["general.name", "UTF-8"]),
    "alignment-0": (lambda: _with_alignment(0), GGUFFormatError, ["general.alignment", "0"]),
    "alignment-not-power-of-2": (lambda: _with_alignment(24), GGUFFormatError, ["general.alignment", "24"]),
    "alignment-wrong-type": (lambda: _with_alignment(32, INT32), GGUFFormatError, ["general.alignment", "INT32"]),
}


def _with_alignment(value: int, vtype: int = UINT32) -> GGUFSpec:
    s = valid()
    s.kvs.append(KV("general.alignment", vtype, value))
    return s


@pytest.mark.parametrize("case", COUNT_CASES)
def test_bad_header_counts_and_lengths(tmp_path, case):
    make, error, fragments = COUNT_CASES[case]
    load_fails(write(tmp_path, make().build()), error, *fragments)


# --- 3. tensors --------------------------------------------------------------------------------------

TENSOR_CASES = {
    "n_dims-5": (dict(dims=[8, 2, 1, 1, 1]), GGUFFormatError, ["a.weight", "n_dims 5"]),
    "n_dims-0": (dict(dims=[]), GGUFFormatError, ["a.weight", "n_dims 0"]),
    "n_dims-2^31-lie": (dict(n_dims=2**31), GGUFFormatError, ["a.weight", f"n_dims {2**31}"]),
    "zero-dimension": (dict(dims=[8, 0]), GGUFFormatError, ["a.weight", "dimension 1 is 0"]),
    "zero-row-length": (dict(dims=[0, 2]), GGUFFormatError, ["a.weight", "dimension 0 is 0"]),
    "negative-dimension": (dict(dims=[8, 2**64 - 2]), GGUFFormatError, ["a.weight", str(2**64 - 2)]),
    "dimension-2^63": (dict(dims=[8, BIG63]), GGUFFormatError, ["a.weight", str(BIG63)]),
    "element-count-overflows": (dict(dims=[2**32, 2**32]), GGUFFormatError, ["a.weight", "elements", "overflow"]),
    "element-count-overflows-4d": (dict(dims=[2**16, 2**16, 2**16, 2**16]), GGUFFormatError,
                                   ["a.weight", "overflow"]),
    "huge-but-representable": (dict(dims=[2**31, 2**31]), GGUFFormatError, ["a.weight", "past the end"]),
    "unknown-type-id": (dict(qtype=99), UnsupportedTypeError, ["a.weight", "type id 99"]),
    "removed-type-id-4": (dict(qtype=4), UnsupportedTypeError, ["a.weight", "type id 4"]),
    "type-id-2^32-1": (dict(qtype=2**32 - 1), UnsupportedTypeError, ["a.weight", f"type id {2**32 - 1}"]),
    "row-not-a-multiple-of-block": (dict(qtype=Q8_0, dims=[40, 1]), GGUFFormatError,
                                    ["a.weight", "row length 40", "Q8_0", "32"]),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensor_info(tmp_path, case):
    changes, error, fragments = TENSOR_CASES[case]
    spec = with_tensor(valid(), 0, **changes)
    spec.data = bytes(96)
    load_fails(write(tmp_path, spec.build()), error, *fragments)


def _two(b_offset: int, b_name: str = "b.weight", data: int = 128) -> GGUFSpec:
    spec = with_tensor(valid(), 1, offset=b_offset, name=b_name)
    spec.data = bytes(data)
    return spec


OFFSET_CASES = {
    "overlapping": (lambda: _two(32), ["b.weight", "overlaps", "a.weight"]),
    "same-offset": (lambda: _two(0), ["overlaps"]),
    "misaligned": (lambda: _two(65), ["b.weight", "offset 65", "alignment 32"]),
    "out-of-file": (lambda: _two(2**40), ["b.weight", "past the end"]),
    "offset-wraps-2^64": (lambda: _two(2**64 - 32), ["b.weight", str(2**64 - 32)]),
    "duplicate-names": (lambda: _two(64, "a.weight"), ["duplicate", "a.weight"]),
    "name-not-utf8": (lambda: _two(64, b"b.\xff"), ["tensor 1", "UTF-8"]),
}


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_bad_tensor_offsets_and_names(tmp_path, case):
    make, fragments = OFFSET_CASES[case]
    load_fails(write(tmp_path, make().build()), GGUFFormatError, *fragments)


def test_tensors_out_of_order_but_disjoint_are_fine(tmp_path):
    spec = valid()
    spec.tensors[0].offset, spec.tensors[1].offset = 32, 0
    f = open_gguf(write(tmp_path, spec.build()))
    assert f.tensors["a.weight"].raw.shape == (2, 32) and f.tensors["b.weight"].raw.shape == (32,)


def test_a_bigger_alignment_is_honoured(tmp_path):
    spec = _with_alignment(64)
    spec.alignment = 64
    spec.tensors[1].offset = 64
    f = open_gguf(write(tmp_path, spec.build()))
    assert f.tensors["b.weight"].raw[0] == 64 % 251


def test_a_real_model_cut_in_its_tensor_data(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        load_fails(write(tmp_path, data[:cut], f"cut{cut}.gguf"), GGUFFormatError, "past the end")


# --- fuzzing -----------------------------------------------------------------------------------------

BASE = valid().build()
INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, BIG62, BIG63 - 1, BIG63, 2**64 - 1]


def _apply(data: bytes, flips, words, cut) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    for pos, value in words:
        pos %= len(buf) - 8
        buf[pos:pos + 8] = struct.pack("<Q", value)
    return bytes(buf[:cut]) if cut is not None else bytes(buf)


mutations = dict(
    flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6),
    words=st.lists(st.tuples(st.integers(0, 2**16), st.sampled_from(INTERESTING_U64)), max_size=2),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.none() | st.integers(0, len(BASE)), **mutations)
def test_fuzzed_small_file_gives_a_typed_error_or_opens(fuzz_dir, flips, words, cut):
    loads_or_fails_in_one_line(write(fuzz_dir, _apply(BASE, flips, words, cut), "fuzz.gguf"))


def loads_or_fails_in_one_line(path) -> None:
    """load_model(path) succeeds or raises a typed one-line error, within 5 seconds."""
    with watchdog(5):
        try:
            load_model(path)
        except WorkbenchError as exc:
            assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def small_model(model_factory):
    """A real (small) model file: its header has every key the loader reads, tokenizer arrays included."""
    path = model_factory(n_layers=1, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4, n_experts_used=2,
                         moe_ff=32, vocab_size=300, tokenizer="synthetic")
    from gguf import GGUFReader

    return path.read_bytes(), GGUFReader(path).data_offset


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), **mutations)
def test_fuzzed_model_header_gives_a_typed_error_or_loads(small_model, fuzz_dir, data, flips, words):
    raw, header_end = small_model
    flips = [(pos % header_end, v) for pos, v in flips]
    words = [(pos % (header_end - 8), v) for pos, v in words]
    cut = data.draw(st.none() | st.integers(0, len(raw)), label="cut")
    loads_or_fails_in_one_line(write(fuzz_dir, _apply(raw, flips, words, cut), "fuzz-model.gguf"))
