"""Shared fixtures: tiny qwen3moe GGUF files written by our own fixture factory (engine/synth.py).

Nothing is downloaded. Files are written once per test session (per xdist worker) and cached by spec.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(**spec_fields) -> Path of a GGUF written with SynthSpec(**fields); cached per spec."""
    from engine.synth import SynthSpec, write_model

    cache: dict = {}
    root = tmp_path_factory.mktemp("models")

    def make(**fields) -> Path:
        spec = SynthSpec(**fields)
        key = repr(dataclasses.astuple(spec))
        if key not in cache:
            path = root / f"m{len(cache)}.gguf"
            write_model(path, spec)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_path(model_factory) -> Path:
    """The default test model: F32, 2 layers, 8 experts / 2 used, a trained BPE tokenizer, ChatML."""
    return model_factory()


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from engine.model import load_model

    return load_model(tiny_path)


def run_cli(*args, stdin=None, env=None, timeout=300):
    """Run the real `trace` command in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "traces", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=e, timeout=timeout, cwd=ROOT)


@pytest.fixture
def cli():
    return run_cli
