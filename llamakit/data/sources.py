"""Find input files and read documents from them: plain text, JSON Lines, JSON and Parquet.

Formats are chosen by file name ending; anything not JSON or Parquet is read as text:
- text (.txt, .md, .py, ...): one document per file, or pieces cut at `separator` when given;
- .jsonl / .json (optionally .gz): one document per object, taken from `field` (a .json file holds
  a list of objects, one object, or JSON Lines under a .json name);
- .parquet: one document per row of column `field`.
Text is decoded as UTF-8. Invalid bytes become U+FFFD with a warning naming the file, rather than
stopping a long run for one bad byte; files that look binary (a NUL byte near the start) are
skipped with a warning. A null field counts as an empty document (the length filter drops it).
Folders are searched recursively, skipping hidden files and folders (.git, .cache, ...).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from llamakit.errors import DataError

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = "*?["
_BINARY_PROBE = 8192


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files named by inputs (files, folders searched recursively, glob patterns with **), sorted and unique."""
    if not inputs:
        raise DataError("no inputs given; pass files, folders or glob patterns such as 'data/**/*.jsonl'")
    files: set[Path] = set()
    for spec in inputs:
        files.update(_expand(str(spec)))
    return sorted(files)


def _expand(spec: str) -> list[Path]:
    """The files one input names; DataError when it names none."""
    if any(char in spec for char in _GLOB_CHARS) and not Path(spec).exists():
        matches = [Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)]
        files = [f for m in matches for f in (_walk(m) if m.is_dir() else [m])]
        if not files:
            raise DataError(f"the pattern {spec!r} matches no files; check the path (quote it so the shell "
                            "does not expand it, and use ** to search subfolders)")
        return [f.resolve() for f in files]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"input {spec} does not exist; pass existing files, folders or glob patterns")
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"input folder {spec} contains no files (hidden ones are skipped)")
        return [f.resolve() for f in files]
    return [path.resolve()]


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file under folder, at any depth."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".")]
    return files


def read_documents(files: Iterable[Path], field: str = "text", separator: str | None = None) -> Iterator[str]:
    """Every document in files, in order."""
    for path in files:
        yield from read_file(path, field, separator)


def read_file(path: Path, field: str = "text", separator: str | None = None) -> Iterator[str]:
    """The documents in one file, read according to its name ending."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, field)
    elif name.endswith(JSON_SUFFIXES):
        yield from _read_json(path, field)
    else:
        yield from _read_text(path, separator)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; DataError when unreadable."""
    with _open(path) as f:
        return _reading(path, f.read)


def _open(path: Path) -> IO[bytes]:
    """path opened for binary reading, through gzip when its name ends in .gz."""
    return _reading(path, lambda: gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb"))


def _reading(path: Path, action):
    """action(), with read errors (missing file, bad gzip data) raised as DataError naming path."""
    try:
        return action()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); check that it is a "
                        "readable (and, for .gz, complete) file") from None


def _decode(path: Path, data: bytes, where: str | None = None) -> str:
    """data as UTF-8; invalid bytes become U+FFFD, with a warning."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        logger.warning("%s is not valid UTF-8 (byte %d); invalid bytes were replaced by U+FFFD", where or path,
                       err.start)
        return data.decode("utf-8", "replace")


def _read_text(path: Path, separator: str | None) -> Iterator[str]:
    """A text file as one document, or as the pieces between separators."""
    data = _read_bytes(path)
    if b"\0" in data[:_BINARY_PROBE]:
        logger.warning("skipped %s: it looks like a binary file (it has NUL bytes)", path)
        return
    text = _decode(path, data).removeprefix("\ufeff")  # a byte-order mark is not text
    yield from (text.split(separator) if separator else [text])


def _read_json(path: Path, field: str) -> Iterator[str]:
    """The field of each object in a JSON Lines file, or in a JSON file holding a list of objects."""
    if path.name.lower().endswith((".json", ".json.gz")):
        text = _decode(path, _read_bytes(path)).removeprefix("\ufeff")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data" after a first object: JSON Lines under a .json name
                raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file, or name it .jsonl "
                                "if it holds one object per line") from None
        else:
            yield from _objects_field(path, data, field)
            return
    yield from _read_jsonl(path, field)


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    """The field of each object in a JSON Lines file, streamed line by line."""
    with _open(path) as f:
        for number, raw in enumerate(_lines(path, f), start=1):
            line = _decode(path, raw, f"{path}:{number}").removeprefix("\ufeff")
            if line.strip():
                yield _field(f"{path}:{number}", _parse_line(path, number, line), field)


def _lines(path: Path, f: IO[bytes]) -> Iterator[bytes]:
    """The lines of an open file, with read errors (e.g. a truncated .gz) raised as DataError."""
    iterator = iter(f)
    while (line := _reading(path, lambda: next(iterator, None))) is not None:
        yield line


def _parse_line(path: Path, number: int, line: str) -> object:
    """One JSON Lines row, or a DataError pointing at it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); each line of a .jsonl file must be one JSON "
                        "object, e.g. {\"text\": \"...\"}") from None


def _objects_field(path: Path, data: object, field: str) -> Iterator[str]:
    """The field of each object in a parsed .json file."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected a list of objects with a "
                        f"{field!r} field")
    for index, row in enumerate(data):
        yield _field(f"{path}[{index}]", row, field)


def _field(where: str, row: object, field: str) -> str:
    """row[field] as a str; DataError naming `where` when row is not an object or lacks a text field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: is a JSON {type(row).__name__}, not an object; expected objects like "
                        f"{{{json.dumps(field)}: \"...\"}}")
    if field not in row:
        keys = ", ".join(map(repr, list(row)[:8])) or "none"
        raise DataError(f"{where}: has no {field!r} field (its fields: {keys}); pass the field that holds the "
                        "text with --field")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a JSON {type(value).__name__}, not a string; pass the field "
                        "that holds the text with --field")
    return value


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    """Column `field` of a Parquet file, one document per row, read in batches."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"cannot read {path} as Parquet ({err}); check that the file is complete") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: has no column {field!r} (its columns: {', '.join(columns[:8])}); pass the column "
                        "that holds the text with --field")
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {field!r} holds {type(value).__name__} values, not strings; pass "
                                "the column that holds the text with --field")
            yield value or ""


def input_fingerprint(files: Sequence[Path]) -> list[dict]:
    """Path, size and modification time of each file: what tells whether a prepared folder is stale."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries
