"""SFT rows: reading JSON / JSON Lines / Parquet, and a clear DataError for every bad file, row and setting."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamakit.data.sft import SFTDataConfig, encode_alpaca, load_sft, read_records, render_alpaca
from llamakit.errors import DataError

ROWS = [{"instruction": "Add 2 and 2.", "input": "", "output": "4"},
        {"instruction": "Name a colour.", "input": "Warm ones only.", "output": "Red"}]
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, tokenizer, rows, **settings):
    """load_sft on rows written as a .json list."""
    path = write(tmp_path, "rows.json", json.dumps(rows))
    return load_sft(SFTDataConfig(path=str(path), **{"val_fraction": 0.5, **settings}), tokenizer)


# Reading


def test_json_jsonl_gzip_and_parquet_give_the_same_rows(tmp_path):
    lines = "".join(json.dumps(row) + "\n" for row in ROWS)
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    files = [write(tmp_path, "a.json", json.dumps(ROWS)), write(tmp_path, "b.jsonl", lines + "\n"),
             write(tmp_path, "c.json", lines), tmp_path / "z.jsonl.gz", tmp_path / "p.parquet"]
    for path in files:
        assert read_records(path) == ROWS, path


def test_parquet_chat_messages_come_back_as_dicts(tmp_path, tokenizer):
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), tmp_path / "chat.parquet")
    assert read_records(tmp_path / "chat.parquet") == [CHAT, CHAT]
    cfg = SFTDataConfig(path=str(tmp_path / "chat.parquet"), val_fraction=0.5, chat_format="llama2")
    train, val, report = load_sft(cfg, tokenizer)
    assert report["format"] == "chat" and train.num_samples == val.num_samples == 1


@pytest.mark.parametrize("name, text, match", [
    ("bad.json", '[{"instruction": "x",\n "output": }]', r"bad\.json:2: not valid JSON"),
    ("bad.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": \n', r"bad\.jsonl:2: not valid JSON"),
    ("empty.json", "[]", r"empty\.json holds no rows"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl holds no rows"),
    ("object.json", '{"instruction": "x"}', r"object\.json: holds a JSON dict; expected a list"),
    ("scalars.json", '[{"instruction": "x", "output": "y"}, 3]', r"scalars\.json\[1\]: is a JSON int, not an object"),
    ("data.csv", "instruction,output\n", r"data\.csv: unknown file type"),
])
def test_bad_files(tmp_path, name, text, match):
    with pytest.raises(DataError, match=match):
        read_records(write(tmp_path, name, text))


def test_missing_file_folder_and_broken_parquet(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json does not exist; pass a \.json"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        read_records(tmp_path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"cannot read .*broken\.parquet as Parquet"):
        read_records(tmp_path / "broken.parquet")
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(tmp_path / "latin1.json")


# Rows


@pytest.mark.parametrize("change, match", [
    ({"instruction": None}, r"rows\.json\[1\]: field 'instruction' is a null, not a string"),
    ({"output": 4}, r"rows\.json\[1\]: field 'output' is a number, not a string"),
    ({"input": ["a"]}, r"rows\.json\[1\]: field 'input' is a list, not a string"),
])
def test_alpaca_rows_with_wrong_types(tmp_path, tokenizer, change, match):
    with pytest.raises(DataError, match=match):
        load(tmp_path, tokenizer, [ROWS[0], {**ROWS[1], **change}, ROWS[0]], val_fraction=0.1)


def test_alpaca_rows_missing_a_field(tmp_path, tokenizer):
    rows = [ROWS[0], ROWS[1], {"instruction": "x", "response": "y"}]
    with pytest.raises(DataError, match=r"rows\.json\[2\]: has no 'output' field \(its fields: 'instruction', "
                                        r"'response'\); alpaca rows need"):
        load(tmp_path, tokenizer, rows, val_fraction=0.1)
    with pytest.raises(DataError, match="the record: has no 'instruction' field"):
        render_alpaca({"output": "y"})
    with pytest.raises(DataError, match="has no 'output' field"):
        encode_alpaca(tokenizer, {"instruction": "x"})


def test_unknown_row_shape_in_auto_format(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"rows\.json\[0\]: cannot tell the format.*'prompt', 'completion'"):
        load(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}] * 2)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "Hi"}], r"\[1\]: field 'messages': the last message \(index 0\) is from 'user'"),
    ([{"role": "system", "content": "Be kind"}, {"role": "assistant", "content": "Hi"}], "no 'user' message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "message 1 is from 'user' but should be from 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "message 1 has no str 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "unknown role 'bot'"),
    ([], "the dialog is an empty list"),
    ("Hi", "the dialog is a str"),
])
def test_bad_dialogs_name_the_row(tmp_path, tokenizer, messages, match):
    with pytest.raises(DataError, match=match):
        load(tmp_path, tokenizer, [CHAT, {"messages": messages}, CHAT], chat_format="llama2", val_fraction=0.1)


def test_chat_rows_need_the_messages_field(tmp_path, tokenizer):
    rows = [{"conversation": CHAT["messages"]}] * 2
    with pytest.raises(DataError, match=r"\[0\]: has no 'messages' field .*set messages_field"):
        load(tmp_path, tokenizer, rows, format="chat", chat_format="llama2")
    train, _, _ = load(tmp_path, tokenizer, rows, messages_field="conversation", chat_format="llama2")
    assert train.num_samples == 1


# Settings


@pytest.mark.parametrize("settings, match", [
    ({"format": "sharegpt"}, "unknown fine-tuning data format 'sharegpt'"),
    ({"truncation": "left"}, "unknown truncation 'left'"),
    ({"seq_len": 0}, "seq_len is 0"),
    ({"max_examples": 0}, "max_examples is 0"),
    ({"val_fraction": 0.0}, "val_fraction is 0.0, which leaves the train or validation split empty"),
    ({"val_fraction": 1.0}, "val_fraction is 1.0"),
    ({"format": "chat", "chat_format": "chatml"}, "unknown chat_format 'chatml'"),
    ({"format": "chat", "chat_format": "llama3"}, "chat_format 'llama3': the llama3 chat style needs a Llama 3"),
])
def test_bad_settings(tmp_path, tokenizer, settings, match):
    rows = [CHAT] * 4 if settings.get("format") == "chat" else ROWS * 2
    with pytest.raises(DataError, match=match):
        load(tmp_path, tokenizer, rows, **settings)


def test_too_few_rows_to_split(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"has 1 row\(s\), too few to hold out val_fraction = 0.05.*give a val_path"):
        load(tmp_path, tokenizer, ROWS[:1], val_fraction=0.05)


def test_explicit_format_checks_every_row(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"\[0\]: has no 'instruction' field"):
        load(tmp_path, tokenizer, [CHAT, CHAT], format="alpaca")
