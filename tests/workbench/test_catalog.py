"""The app opens models only from the embedded folder and the folders in WORKBENCH_MODELS."""

from __future__ import annotations

import pytest

from engine.errors import InputError
from workbench.catalog import EMBEDDED_DIR, available_models, resolve_model


def test_embedded_models_are_allowed():
    assert resolve_model(EMBEDDED_DIR / "stdlib-coder-q8_0.gguf").is_file()


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", str(EMBEDDED_DIR / ".." / ".." / "README.md"),
                                  str(EMBEDDED_DIR / ".." / "models" / ".." / "app.py")])
def test_paths_outside_the_allowed_folders_are_refused(path):
    with pytest.raises(InputError):
        resolve_model(path)


def test_workbench_models_folder_and_symlinks_out_of_it(tmp_path, monkeypatch, tiny_path):
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "mine.gguf").write_bytes(tiny_path.read_bytes())
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    (allowed / "escape.gguf").symlink_to(outside)
    monkeypatch.setenv("WORKBENCH_MODELS", str(allowed))
    assert resolve_model(allowed / "mine.gguf") == (allowed / "mine.gguf").resolve()
    with pytest.raises(InputError, match="outside"):
        resolve_model(allowed / "escape.gguf")
    with pytest.raises(InputError, match="outside"):
        resolve_model(allowed / ".." / "outside.gguf")
    labels = [c.label for c in available_models()]
    assert "mine.gguf" in labels and "escape.gguf" not in labels
    assert labels[0].startswith("embedded: ")
