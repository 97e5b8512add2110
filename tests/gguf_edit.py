"""Test utility: copy a GGUF file with changes (drop or reshape a tensor, set or drop a metadata key).

Used to make the malformed-model cases of shared/docs/robustness.md (item 4) from a good generated
file. Written with gguf-py's reader and writer, so the output is a well-formed GGUF file whose only
fault is the one asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def _value(field):
    if field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents()), field.types[0], field.types[-1]
    return field.contents(), field.types[0], None


def rewrite(src: Path, dst: Path, *, drop_tensors=(), set_kv: dict | None = None, drop_kv=(),
            replace_tensors: dict | None = None) -> Path:
    """set_kv: key -> (value, GGUFValueType[, sub_type]); replace_tensors: name -> (uint8/float array, raw_shape, qtype)."""
    reader = GGUFReader(src, "r")
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=arch, use_temp_file=False)
    set_kv = dict(set_kv or {})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv or key in set_kv:
            continue
        value, vtype, sub = _value(field)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if "general.architecture" in set_kv:
        value = set_kv.pop("general.architecture")[0]
        writer.add_key_value("general.architecture", value, GGUFValueType.STRING)
    else:
        writer.add_key_value("general.architecture", arch, GGUFValueType.STRING)
    for key, spec in set_kv.items():
        writer.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    replace = dict(replace_tensors or {})
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in replace:
            data, raw_shape, qtype = replace[t.name]
            writer.add_tensor(t.name, np.ascontiguousarray(data), raw_shape=raw_shape, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)
