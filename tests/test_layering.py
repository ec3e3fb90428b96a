"""Imports flow one way: model and tokenizer import nothing else from the package; nothing imports the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llamakit"
ALLOWED = {  # layer -> layers it may import (errors is a leaf every layer may use)
    "model": {"model", "errors"},
    "tokenizer": {"tokenizer", "errors"},
    "checkpoint": {"checkpoint", "model", "tokenizer", "errors"},
    "generate": {"generate", "model", "tokenizer", "checkpoint", "errors"},
    "data": {"data", "tokenizer", "errors"},
    "train": {"train", "data", "model", "tokenizer", "checkpoint", "generate", "errors"},
    "eval": {"eval", "model", "tokenizer", "checkpoint", "generate", "errors"},
}


def _imported_layers(path: Path) -> set[str]:
    """Top-level package modules that `path` imports, in any form (absolute, from-package, relative)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ("llamakit", "checkpoint")
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            modules = [module + [a.name] for a in node.names] if len(module) == 1 else [module]
        else:
            continue
        layers |= {m[1] for m in modules if len(m) > 1 and m[0] == "llamakit"}
    return layers


def test_the_checker_sees_every_import_form():
    source = "import llamakit.model\nfrom llamakit import checkpoint\nfrom ..tokenizer import base\nfrom . import x\n"
    probe = PACKAGE / "model" / "_probe_for_test.py"
    probe.write_text(source)
    try:
        assert _imported_layers(probe) == {"model", "checkpoint", "tokenizer"}
    finally:
        probe.unlink()


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        assert _imported_layers(path) <= ALLOWED[layer], f"{path} imports {_imported_layers(path) - ALLOWED[layer]}"


def test_nothing_imports_the_cli():
    """Modules of the llamakit.cli package may import each other; outside it only `python -m llamakit` may."""
    cli = PACKAGE / "cli"
    for path in PACKAGE.rglob("*.py"):
        if path != PACKAGE / "__main__.py" and not path.is_relative_to(cli):
            assert "cli" not in _imported_layers(path), path
