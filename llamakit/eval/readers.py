"""Reading evaluation files: JSONL, label lists and CSV rows, with errors that name the file and line."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamakit.errors import EvalError


def open_text(path: Path):
    """A text stream for path; .bz2 and .gz files are decompressed."""
    if not path.is_file():
        raise EvalError(f"data file {path} does not exist; pass the path of the task's file (--data TASK=PATH)")
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def read_lines(path: Path) -> list[str]:
    """The lines of a text file without their line ends."""
    try:
        with open_text(path) as f:
            return f.read().splitlines()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise EvalError(f"{path}: cannot read it as UTF-8 text ({e}); pass the task's original file") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def read_json_object(path: Path, what: str, fields: str) -> dict[str, Any]:
    """The one JSON object of a per-item file (a RACE article, a MATH problem), holding `fields`."""
    try:
        data = json.loads("\n".join(read_lines(path)))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e.msg}); {what} file holds one JSON object") from None
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected a JSON object with {fields}")
    return data


def numbered_order(path: Path) -> tuple:
    """Sort key of per-item files named <n>.json (or .txt) in folders: by folder, then by number."""
    return (str(path.parent), int(path.stem) if path.stem.isdigit() else 0, path.name)


def read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each row of a CSV file."""
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if row]
    except csv.Error as e:
        raise EvalError(f"{path}: malformed CSV ({e}); pass the original file") from None


def field(row: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str, empty_ok: bool = False) -> Any:
    """row[key], which must exist and have type kind (a str: non-empty unless empty_ok); `where` is 'file:line'."""
    if key not in row:
        raise EvalError(f"{where}: missing field {key!r} (has {sorted(row)}); is this the task's official format?")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip() and not empty_ok):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalError(f"{where}: field {key!r} should be a non-empty {name}, got {value!r}")
    return value


def read_labels(path: Path, count: int, allowed: set[str]) -> list[str]:
    """One label per line (PIQA's and SIQA's *-labels.lst), exactly `count` of them."""
    labels = [line.strip() for line in read_lines(path)]
    labels = labels[:-1] if labels and not labels[-1] else labels
    if len(labels) != count:
        raise EvalError(f"{path} has {len(labels)} labels for {count} examples; pass the labels file that belongs "
                        "to the data file")
    for number, label in enumerate(labels, start=1):
        if label not in allowed:
            raise EvalError(f"{path}:{number}: label {label!r} is not one of {sorted(allowed)}")
    return labels


def labels_beside(path: Path) -> Path:
    """The labels file that the official PIQA/SIQA releases put beside `name.jsonl`: `name-labels.lst`."""
    return path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")


def sha256_of(paths: list[Path]) -> str:
    """The sha256 of one file; for several, of their `sha256sum` lines sorted by name (`sha256sum * | sha256sum`)."""
    if len(paths) == 1:
        return _file_sha256(paths[0])
    lines = "".join(f"{_file_sha256(p)}  {p.name}\n" for p in sorted(paths, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
