"""Executable contracts: YAML files naming falsifiers and the tests that discharge them, and the
JSON Schema of the trace payload."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def payload_schema() -> dict:
    return json.loads((HERE / "trace_payload.schema.json").read_text(encoding="utf-8"))


def validate_payload(payload: dict) -> None:
    """Raise jsonschema.ValidationError when `payload` does not match the trace payload schema."""
    import jsonschema

    jsonschema.validate(payload, payload_schema())
