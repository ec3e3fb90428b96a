"""Reading inputs: files, folders, globs; text, JSON Lines, JSON, Parquet; clear errors for bad inputs."""

import gzip
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamakit.data.sources import input_fingerprint, read_documents, read_file, resolve_inputs
from llamakit.errors import DataError
from tests.data.corpus import write_jsonl


@pytest.fixture
def tree(tmp_path):
    """a.txt, sub/b.md, sub/deeper/c.py, a hidden file and a hidden folder."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for rel, text in {"a.txt": "alpha", "sub/b.md": "# beta", "sub/deeper/c.py": "x = 1\n",
                      ".hidden.txt": "no", ".git/config": "no"}.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_files_folders_and_globs(tree):
    everything = [tree / "a.txt", tree / "sub" / "b.md", tree / "sub" / "deeper" / "c.py"]
    assert resolve_inputs([tree]) == sorted(everything)
    assert resolve_inputs([str(tree / "**" / "*.py")]) == [tree / "sub" / "deeper" / "c.py"]
    assert resolve_inputs([str(tree / "*.txt"), tree / "a.txt"]) == [tree / "a.txt"]  # unique
    assert list(read_documents(resolve_inputs([tree]))) == ["alpha", "# beta", "x = 1\n"]


def test_text_separator_bom_and_gzip(tmp_path):
    (tmp_path / "s.txt").write_text("\ufeffone<|endoftext|>two")
    assert list(read_file(tmp_path / "s.txt")) == ["one<|endoftext|>two"]
    assert list(read_file(tmp_path / "s.txt", separator="<|endoftext|>")) == ["one", "two"]
    (tmp_path / "z.txt.gz").write_bytes(gzip.compress(b"zipped"))
    assert list(read_file(tmp_path / "z.txt.gz")) == ["zipped"]


def test_invalid_utf8_is_replaced_and_binary_skipped(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with caplog.at_level(logging.WARNING):
        assert list(read_documents([tmp_path / "bad.txt", tmp_path / "image.png"])) == ["caf\ufffd ok"]
    assert "not valid UTF-8" in caplog.text and "binary" in caplog.text


def test_jsonl_json_and_parquet(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"body": "three"}\n\n{"body": null}\n'))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "four"}, {"text": "five"}]))
    (tmp_path / "d.json").write_text('{"text": "six"}\n{"text": "seven"}\n')  # JSON Lines under a .json name
    pq.write_table(pa.table({"text": ["eight", None], "n": [1, 2]}), tmp_path / "e.parquet")
    assert list(read_file(tmp_path / "a.jsonl")) == ["one", "two"]
    assert list(read_file(tmp_path / "b.jsonl.gz", field="body")) == ["three", ""]
    assert list(read_file(tmp_path / "c.json")) == ["four", "five"]
    assert list(read_file(tmp_path / "d.json")) == ["six", "seven"]
    assert list(read_file(tmp_path / "e.parquet")) == ["eight", ""]


def test_fingerprint_changes_with_the_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = input_fingerprint([path])
    path.write_text("one two")
    assert input_fingerprint([path]) != before and before[0]["path"] == str(path)


@pytest.mark.parametrize("inputs, message", [
    (["missing.txt"], "input missing.txt does not exist"),
    (["*.nothing"], "matches no files"),
    (["empty"], "contains no files"),
    ([], "no inputs given"),
])
def test_bad_inputs(inputs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=message):
        resolve_inputs(inputs)


@pytest.mark.parametrize("name, content, message", [
    ("rows.jsonl", '{"text": "ok"}\n{"text": "cut\n', "rows.jsonl:2: not valid JSON"),
    ("rows.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "rows.jsonl:2: has no 'text' field (its fields: 'body'); "
                                                       "pass the field that holds the text with --field"),
    ("rows.jsonl", '{"text": 3}\n', "rows.jsonl:1: field 'text' is a JSON int"),
    ("rows.jsonl", '["text"]\n', "rows.jsonl:1: is a JSON list, not an object"),
    ("rows.json", '{"text": "a"', "rows.json:1: not valid JSON"),
    ("rows.json", '"just a string"', "holds a JSON str"),
    ("rows.json", '[{"text": "a"}, {"txt": "b"}]', "rows.json[1]: has no 'text' field"),
    ("rows.jsonl.gz", "not gzip", "cannot read"),
])
def test_bad_rows(name, content, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        list(read_file(tmp_path / name))


def test_bad_parquet(tmp_path):
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="has no column 'text' \\(its columns: body, n\\)"):
        list(read_file(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="holds int values"):
        list(read_file(tmp_path / "t.parquet", field="n"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read .* as Parquet"):
        list(read_file(tmp_path / "broken.parquet"))
