"""Imports flow one way: model and tokenizer import nothing else from the package; nothing imports the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llamakit"
ALLOWED = {  # layer -> layers it may import (errors is a leaf every layer may use)
    "model": {"model", "errors"},
    "tokenizer": {"tokenizer", "errors"},
    "checkpoint": {"checkpoint", "model", "tokenizer", "errors"},
}


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        layers |= {n.split(".")[1] for n in names if n.startswith("llamakit.")}
    return layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        assert _imported_layers(path) <= ALLOWED[layer], f"{path} imports {_imported_layers(path) - ALLOWED[layer]}"


def test_nothing_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "cli" not in _imported_layers(path), path
