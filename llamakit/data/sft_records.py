"""Fine-tuning rows: read them from JSON, JSON Lines or Parquet files and check their fields.

A row is one JSON object (or Parquet row). Alpaca rows have str `instruction` and `output` and an optional
`input`; chat rows hold a list of {role, content} messages (under `messages` unless configured otherwise).
Errors name the row as `file[index]` (0-based, in file order) or, for JSON syntax errors, `file:line`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from llamakit.errors import DataError
from llamakit.tokenizer.chat import ChatFormatError, check_training_dialog

JSON_SUFFIXES = (".json", ".json.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ALPACA_FIELDS = ("instruction", "output")  # required; `input` is optional


def read_records(path: str | os.PathLike[str]) -> list[dict]:
    """Every row of a JSON (a list of objects), JSON Lines (also .gz) or Parquet file, as dicts."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"fine-tuning data {path} {what}; pass a .json, .jsonl or .parquet file")
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        rows = _read_parquet(path)
    elif name.endswith(JSONL_SUFFIXES):
        rows = _read_jsonl(path, _read_text(path))
    elif name.endswith(JSON_SUFFIXES):
        rows = _read_json(path)
    else:
        raise DataError(f"{path}: unknown file type; name fine-tuning data .json (a list of objects), .jsonl "
                        "(one object per line, optionally .gz) or .parquet")
    if not rows:
        raise DataError(f"{path} holds no rows; fine-tuning needs at least one example")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{index}]: is a JSON {type(row).__name__}, not an object; each row must be "
                            "an object such as {\"instruction\": ..., \"output\": ...} or {\"messages\": [...]}")
    return rows


def _read_text(path: Path) -> str:
    """The file's text (gunzipped when named .gz), or DataError when it cannot be read or decoded."""
    try:
        with (gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not JSON
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path} ({err}); check that it is a readable, complete file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None


def _read_json(path: Path) -> list:
    """A .json file: a list of objects (JSON Lines under a .json name are accepted too)."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _read_jsonl(path, text)
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file, or name it .jsonl if it "
                        "holds one object per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected a list of row objects "
                        "([{...}, {...}]) or JSON Lines")
    return data


def _read_jsonl(path: Path, text: str) -> list:
    """One row per non-blank line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); each line of a JSON Lines file must be "
                            "one complete JSON object") from None
    return rows


def _read_parquet(path: Path) -> list:
    """Every row of a Parquet file (nested columns, e.g. a list of message structs, become lists of dicts)."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"cannot read {path} as Parquet ({err}); check that the file is complete") from None


def detect_format(rows: list[dict], messages_field: str, where: str) -> str:
    """'chat' when the first row has the messages field, 'alpaca' when it has `instruction`."""
    first = rows[0]
    if messages_field in first:
        return "chat"
    if "instruction" in first:
        return "alpaca"
    raise DataError(f"{where}[0]: cannot tell the format: the row has neither {messages_field!r} (chat) nor "
                    f"'instruction' (alpaca) (its fields: {_fields(first)}); set format and messages_field")


def check_alpaca_row(where: str, row: dict) -> None:
    """DataError unless row has str instruction and output, and input is absent, null or a str."""
    for key in ALPACA_FIELDS:
        if key not in row:
            raise DataError(f"{where}: has no {key!r} field (its fields: {_fields(row)}); alpaca rows need "
                            "'instruction' and 'output' (and optionally 'input')")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} is a {_json_type(row[key])}, not a string; fix the row")
    if row.get("input") is not None and not isinstance(row["input"], str):
        raise DataError(f"{where}: field 'input' is a {_json_type(row['input'])}, not a string; use a string, "
                        "or leave it out (or empty) when the instruction needs no input")


def check_chat_row(where: str, row: dict, messages_field: str) -> list[dict]:
    """The row's messages, or DataError unless they form a dialog that ends with an assistant reply."""
    if messages_field not in row:
        raise DataError(f"{where}: has no {messages_field!r} field (its fields: {_fields(row)}); chat rows hold "
                        "a list of {'role', 'content'} messages (set messages_field if it has another name)")
    try:
        check_training_dialog(row[messages_field])
    except ChatFormatError as err:
        raise DataError(f"{where}: field {messages_field!r}: {err}") from None
    return row[messages_field]


def _fields(row: dict) -> str:
    """The first few field names of a row, for error messages."""
    return ", ".join(map(repr, list(row)[:8])) or "none"


def _json_type(value: object) -> str:
    """The JSON name of a value's type (null, number, list, object...)."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)
