"""File helpers shared by the checkpoint formats: atomic folders, safe loading, state-dict checks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from llamakit import files
from llamakit.errors import CheckpointError


@contextlib.contextmanager
def atomic_directory(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to `dst` only if the block finishes."""
    dst = Path(dst)
    _check_destination(dst, overwrite, want_dir=True)
    with files.atomic_directory(dst, full=lambda: _disk_full_error(dst),
                                unwritable=lambda e: _unwritable_error(dst, e)) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path that replaces `dst` only if the block finishes."""
    dst = Path(dst)
    _check_destination(dst, overwrite, want_dir=False)
    with files.atomic_file(dst, full=lambda: _disk_full_error(dst)) as tmp:
        yield tmp


def check_separate(src: Path, dst: Path) -> None:
    """Refuse an output that is its source, lies inside it, or holds it: writing it would damage the source."""
    src, dst = Path(src).resolve(), Path(dst).resolve()  # resolved: a symlink or `..` cannot hide the overlap
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        where = "is" if dst == src else "is inside" if dst.is_relative_to(src) else "contains"
        raise CheckpointError(f"{dst}: the output {where} the source {src}; writing it would damage the "
                              "source, so choose an output path outside it")


def _disk_full_error(dst: Path) -> CheckpointError:
    return CheckpointError(f"{dst}: the disk holding {dst.absolute().parent} is full (or your quota there is "
                           "used up); nothing was written; free some space or choose an output on another disk")


def _check_destination(dst: Path, overwrite: bool, want_dir: bool) -> None:
    """dst may be written: it is new (or replaceable and of the same kind), and its folder can be made."""
    if dst.exists():
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists; choose a new output path or delete it first")
        if dst.is_dir() != want_dir:
            raise CheckpointError(f"{dst}: exists and is a {'file' if want_dir else 'folder'}; "
                                  "refusing to replace it with a checkpoint " + ("folder" if want_dir else "file"))
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable_error(dst, e) from None


def _unwritable_error(dst: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"{dst}: cannot create the output ({e.strerror}: {e.filename}); choose a writable location")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """Parse a JSON object, naming the file when it is missing or malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged or not a config") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pth/.bin state dict safely (weights only, no arbitrary unpickling) and lazily (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors come in many types; all mean the same to the user
        raise CheckpointError(f"{path}: cannot load as a PyTorch weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]}); only plain tensor state dicts are accepted") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], where: Path) -> None:
    """Every expected tensor is present with its shape, and nothing unknown is left over."""
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weights {_short(missing)}; the checkpoint is incomplete "
                              "or its config.json/params.json describes a different model")
    if unknown:
        raise CheckpointError(f"{where}: unknown weights {_short(unknown)}; this is not a Llama checkpoint "
                              "or its config describes fewer layers than it holds")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(f"{where}: weight {name} has shape {tuple(state[name].shape)} but the config "
                                  f"implies {tuple(shape)}; the config does not match the weights")


def _short(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
