"""Imports flow one way: model and tokenizer import only the neutral leaves (errors, files, runtime); nothing imports
the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llamakit"
LEAVES = {"errors", "files", "runtime"}  # neutral modules every layer may import; they import only errors
ALLOWED = {  # layer -> layers it may import (besides the leaves)
    "model": {"model"},
    "tokenizer": {"tokenizer"},
    "checkpoint": {"checkpoint", "model", "tokenizer"},
    "generate": {"generate", "model", "tokenizer", "checkpoint"},
    "data": {"data", "tokenizer"},
    "train": {"train", "data", "model", "tokenizer", "checkpoint", "generate"},
    "eval": {"eval", "model", "tokenizer", "checkpoint", "generate"},
    "guard": {"guard", "model", "tokenizer", "checkpoint", "generate"},
    "scaling": {"scaling", "train", "data", "model", "checkpoint", "tokenizer"},
}


def _imported_layers(path: Path, source: str | None = None) -> set[str]:
    """Top-level package modules that `path` (or `source` placed there) imports, in any form (absolute,
    from-package, relative)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ("llamakit", "checkpoint")
    layers = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
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
    probe = PACKAGE / "model" / "probe.py"  # read as if it lived there; nothing is written into the package
    assert not probe.exists()
    assert _imported_layers(probe, source) == {"model", "checkpoint", "tokenizer"}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        allowed = ALLOWED[layer] | LEAVES
        assert _imported_layers(path) <= allowed, f"{path} imports {_imported_layers(path) - allowed}"


def test_leaves_import_only_errors():
    for path in (PACKAGE / f"{leaf}.py" for leaf in LEAVES):
        assert not path.exists() or _imported_layers(path) <= {"errors"}, path


@pytest.mark.parametrize("text", ["init_process_group", "init_device_mesh", "WORLD_SIZE", "LOCAL_RANK"])
def test_only_the_runtime_sets_up_processes(text):
    """Training, generation and eval join a torchrun job through llamakit.runtime, never on their own."""
    assert [p for p in PACKAGE.rglob("*.py") if text in p.read_text()] == [PACKAGE / "runtime.py"]


def test_nothing_imports_the_cli():
    """Modules of the llamakit.cli package may import each other; outside it only `python -m llamakit` may."""
    cli = PACKAGE / "cli"
    for path in PACKAGE.rglob("*.py"):
        if path != PACKAGE / "__main__.py" and not path.is_relative_to(cli):
            assert "cli" not in _imported_layers(path), path
