"""Which model files the app may open: the embedded models, plus .gguf files under the folders
listed in WORKBENCH_MODELS (os.pathsep-separated). Anything else is refused, including `../` and
symlinks that lead out of an allowed folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError

EMBEDDED_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "stdlib-coder-q8_0.gguf"


@dataclass(frozen=True)
class ModelChoice:
    label: str
    path: Path


def allowed_folders() -> list[Path]:
    folders = [EMBEDDED_DIR]
    for part in os.environ.get("WORKBENCH_MODELS", "").split(os.pathsep):
        if part.strip():
            folders.append(Path(part.strip()).expanduser().resolve())
    return folders


def resolve_model(path: str | os.PathLike) -> Path:
    """The real path of `path` if it is a .gguf file inside an allowed folder; InputError otherwise."""
    real = Path(path).expanduser().resolve()
    if real.suffix.lower() != ".gguf":
        raise InputError(f"{path}: not a .gguf file")
    for folder in allowed_folders():
        if real.is_relative_to(folder):
            if not real.is_file():
                raise InputError(f"{path}: no such model file")
            return real
    raise InputError(f"{path}: outside the allowed model folders (set WORKBENCH_MODELS to add one)")


def available_models() -> list[ModelChoice]:
    """Embedded models first (the default one first of all), then files under WORKBENCH_MODELS."""
    out: list[ModelChoice] = []
    embedded = sorted(EMBEDDED_DIR.glob("*.gguf"), key=lambda p: (p.name != DEFAULT_MODEL, p.name))
    out += [ModelChoice(f"embedded: {p.name}", p.resolve()) for p in embedded]
    for folder in allowed_folders()[1:]:
        if folder.is_dir():
            for p in sorted(folder.rglob("*.gguf")):
                try:
                    out.append(ModelChoice(str(p.relative_to(folder)), resolve_model(p)))
                except InputError:
                    continue  # a symlink leading out of the folder
    return out
