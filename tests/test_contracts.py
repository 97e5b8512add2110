"""Every falsifier in contracts/*.yaml names a test that exists, so a contract can't silently lose its proof."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = sorted((ROOT / "contracts").glob("*.yaml"))


def test_there_are_contracts():
    assert len(CONTRACTS) >= 7


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            names.add(node.name)
    return names


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda p: p.stem)
def test_every_falsifier_names_an_existing_test(contract):
    doc = yaml.safe_load(contract.read_text(encoding="utf-8"))
    assert doc.get("contract") and doc.get("title")
    falsifiers = doc.get("falsifiers") or []
    assert falsifiers, f"{contract.name} names no falsifier"
    ids = [f["id"] for f in falsifiers]
    assert len(ids) == len(set(ids)), f"{contract.name}: duplicate falsifier ids"
    for f in falsifiers:
        file_part, _, name = f["test"].partition("::")
        path = ROOT / file_part
        assert path.is_file(), f"{f['id']}: {file_part} does not exist"
        assert name in defined_tests(path), f"{f['id']}: {name} is not defined in {file_part}"
