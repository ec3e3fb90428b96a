"""SFT data: Alpaca rendering against the canonical text, loss masks on responses only, truncation, packing, splits."""

import json
import logging
import random

import pytest
import torch

from llamakit.data.sft import (
    IGNORE_INDEX,
    PAD_SEGMENT,
    SFTDataConfig,
    encode_alpaca,
    encode_chat,
    load_sft,
    render_alpaca,
)
from llamakit.data.sft_examples import Encoded, SFTExamples, fit, pack
from llamakit.errors import DataError
from llamakit.tokenizer import load_tokenizer
from llamakit.tokenizer.chat import encode_dialog, stop_ids_for
from tests.data.corpus import prose

DIALOG = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "It is blue on a clear day."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "Dark, with stars."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def alpaca_tiny(assets):
    return json.loads((assets / "sft" / "alpaca_tiny.json").read_text())


@pytest.fixture(scope="module")
def real(assets):
    """Name -> the real Llama 2 / Llama 3 tokenizer."""
    return {name: load_tokenizer(assets / name / "tokenizer.model") for name in ("llama2", "llama3")}


def alpaca_rows(count, seed=0, words=(3, 12)):
    """Synthetic Alpaca rows with prose text; every third one has an input."""
    rng = random.Random(seed)
    return [{"instruction": prose(rng.randint(*words), seed * 1000 + i), "output": prose(rng.randint(*words), i + 7),
             "input": prose(4, i + 99) if i % 3 == 0 else ""} for i in range(count)]


def write_json(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def target_spans(example):
    """The contiguous runs of target ids, as (start, end) index pairs."""
    spans, start = [], None
    for i, flag in enumerate([*example.labels, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


# Alpaca


def test_rendering_equals_the_canonical_text_for_every_row(alpaca_tiny):
    assert len(alpaca_tiny) == 100
    assert {bool(row["input"]) for row in alpaca_tiny} == {True, False}  # both template variants are checked
    for row in alpaca_tiny:
        prompt, response = render_alpaca(row)
        assert prompt + response == row["text"]
        assert response == row["output"] and prompt.endswith("### Response:\n")


def test_input_may_be_missing_or_null():
    row = {"instruction": "Say hi.", "output": "Hi"}
    assert render_alpaca(row) == render_alpaca({**row, "input": None}) == render_alpaca({**row, "input": ""})


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_alpaca_targets_are_exactly_the_response_and_eos(alpaca_tiny, real, name):
    tokenizer = real[name]
    for row in alpaca_tiny:
        example = encode_alpaca(tokenizer, row)
        prompt_ids = tokenizer.encode(render_alpaca(row)[0], bos=True)
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        assert example.labels == [False] * len(prompt_ids) + [True] * (len(example.input_ids) - len(prompt_ids))
        targets = [i for i, flag in zip(example.input_ids, example.labels) if flag]
        assert targets[-1] == tokenizer.eos_id
        assert tokenizer.decode(targets[:-1]) == row["output"]
        assert example.input_ids == tokenizer.encode(row["text"], bos=True, eos=True)


# Chat


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_chat_targets_are_exactly_the_assistant_turns(real, name):
    tokenizer = real[name]
    example = encode_chat(tokenizer, DIALOG, name)
    replies = [m["content"] for m in DIALOG if m["role"] == "assistant"]
    spans = target_spans(example)
    assert len(spans) == len(replies)
    (end_id,) = {tokenizer.eos_id} if name == "llama2" else {tokenizer.special_tokens["<|eot_id|>"]}
    for (start, stop), reply in zip(spans, replies):
        ids = example.input_ids[start:stop]
        assert ids[-1] == end_id
        assert tokenizer.decode(ids[:-1]).strip() == reply  # llama2 keeps Meta's trailing space before eos
    assert example.labels[0] is False


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_chat_prompts_equal_encode_dialog_up_to_each_turn(real, name):
    """Training and inference see the same ids before every assistant reply."""
    tokenizer = real[name]
    example = encode_chat(tokenizer, DIALOG, name)
    turns = [i for i, m in enumerate(DIALOG) if m["role"] == "assistant"]
    for (start, _), turn in zip(target_spans(example), turns):
        assert example.input_ids[:start] == encode_dialog(tokenizer, DIALOG[:turn], name)
    assert example.input_ids[-1] in stop_ids_for(tokenizer, name)


def test_chat_without_system_and_default_style(real):
    dialog = DIALOG[1:3]
    tokenizer = real["llama3"]
    assert encode_chat(tokenizer, dialog, None) == encode_chat(tokenizer, dialog, "llama3")
    example = encode_chat(real["llama2"], dialog, None)
    assert example.input_ids == (real["llama2"].encode(f"[INST] {dialog[0]['content']} [/INST] "
                                                       f"{dialog[1]['content']} ", bos=True, eos=True))


def test_chat_dataset_from_jsonl(real, tmp_path):
    tokenizer = real["llama3"]
    rows = [{"messages": DIALOG[1:3 + 2 * (i % 3)], "id": i} for i in range(12)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, val, report = load_sft(SFTDataConfig(path=str(path), val_fraction=0.2), tokenizer)
    assert (report["format"], report["chat_format"], report["template"]) == ("chat", "llama3", None)
    assert (train.num_samples, val.num_samples) == (9, 3)
    example = train.rows[0][0]
    assert example in [encode_chat(tokenizer, row["messages"], "llama3") for row in rows]
    labels = train.batch([0])["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == [i for i, t in zip(example.input_ids, example.labels) if t]


# Loading, truncation, packing


def test_unpacked_batches_shift_and_pad(tokenizer, tmp_path):
    rows = alpaca_rows(20)
    train, val, report = load_sft(SFTDataConfig(path=write_json(tmp_path, rows), val_fraction=0.1), tokenizer)
    assert (train.num_samples, val.num_samples) == (18, 2)
    examples = [encode_alpaca(tokenizer, r) for r in rows]
    lengths = {len(e.input_ids) for e in examples}
    assert report["train"]["examples"] == 18 and report["train"]["packed_rows"] is None
    batch = train.batch([0, 1, 2])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    first = next(e for e in examples if e.input_ids[1:4] == batch["input_ids"][0, 1:4].tolist())
    n = len(first.input_ids) - 1
    assert batch["input_ids"].shape[1] <= max(lengths) - 1
    assert batch["input_ids"][0, :n].tolist() == first.input_ids[:-1]
    assert (batch["input_ids"][0, n:] == tokenizer.pad_id).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    expected = [i if flag else IGNORE_INDEX for i, flag in zip(first.input_ids[1:], first.labels[1:])]
    assert batch["labels"][0, :n].tolist() == expected


def test_truncate_counts_and_cuts(tokenizer, tmp_path):
    rows = alpaca_rows(30, words=(3, 40))
    prompt_lengths = [len(tokenizer.encode(render_alpaca(r)[0], bos=True)) for r in rows]
    seq_len = max(prompt_lengths) + 5  # every prompt fits, and some responses do not
    rows[5]["instruction"] = prose(400, 1)  # the prompt alone exceeds seq_len: no target survives the cut
    cfg = SFTDataConfig(path=write_json(tmp_path, rows), seq_len=seq_len, val_fraction=0.1)
    train, val, report = load_sft(cfg, tokenizer)
    long = [len(encode_alpaca(tokenizer, r).input_ids) > seq_len + 1 for r in rows]
    stats = [report["train"], report["val"]]
    assert sum(s["dropped_no_target"] for s in stats) == 1
    assert sum(s["truncated"] for s in stats) == sum(long) - 1 > 0
    assert sum(s["examples"] for s in stats) == 29 and report["rows_read"] == 30
    assert max(len(row[0].input_ids) for row in train.rows) == seq_len + 1
    assert train.batch(range(train.num_samples))["input_ids"].shape[1] == seq_len


def test_drop_counts_over_long_examples(tokenizer, tmp_path):
    rows = alpaca_rows(30, words=(3, 40))
    cfg = SFTDataConfig(path=write_json(tmp_path, rows), seq_len=300, truncation="drop", val_fraction=0.1)
    train, val, report = load_sft(cfg, tokenizer)
    long = sum(len(encode_alpaca(tokenizer, r).input_ids) > 301 for r in rows)
    assert 0 < report["train"]["dropped_too_long"] + report["val"]["dropped_too_long"] == long
    assert report["train"]["truncated"] == 0 and train.num_samples + val.num_samples == 30 - long


def test_nothing_left_after_dropping_is_an_error(tokenizer, tmp_path):
    cfg = SFTDataConfig(path=write_json(tmp_path, alpaca_rows(10)), seq_len=4, truncation="drop", val_fraction=0.2)
    with pytest.raises(DataError, match=r"no train example is left from .*data\.json.*raise seq_len"):
        load_sft(cfg, tokenizer)


def test_packing_keeps_examples_whole_and_apart(tokenizer, tmp_path):
    rows = alpaca_rows(40)
    seq_len = 600
    cfg = SFTDataConfig(path=write_json(tmp_path, rows), seq_len=seq_len, packing=True, val_path=None,
                        val_fraction=0.05)
    train, _, report = load_sft(cfg, tokenizer)
    unpacked, _, _ = load_sft(SFTDataConfig(path=cfg.path, seq_len=seq_len, val_fraction=0.05), tokenizer)
    assert report["train"]["packed_rows"] == train.num_samples < report["train"]["examples"]
    assert [e for row in train.rows for e in row] == [e for row in unpacked.rows for e in row]  # order, whole
    batch = train.batch(range(train.num_samples))
    assert set(batch) == {"input_ids", "labels", "segment_ids"}
    longest = max(sum(len(e.input_ids) for e in row) for row in train.rows)
    assert batch["segment_ids"].shape == batch["input_ids"].shape == (train.num_samples, longest - 1)
    assert longest - 1 <= seq_len
    for b, row in enumerate(train.rows):
        assert sum(len(e.input_ids) for e in row) <= seq_len + 1
        segments, labels = batch["segment_ids"][b], batch["labels"][b]
        n = sum(len(e.input_ids) for e in row) - 1
        expected = [s for s, e in enumerate(row) for _ in e.input_ids][:-1]
        assert segments[:n].tolist() == expected and (segments[n:] == PAD_SEGMENT).all()
        boundaries = (segments[1:n] != segments[:n - 1]).nonzero().flatten()
        assert (labels[boundaries] == IGNORE_INDEX).all()  # the last id of an example predicts nothing
    # Packing moves targets between rows but neither adds nor loses any.
    all_unpacked = unpacked.batch(range(unpacked.num_samples))["labels"]
    assert (batch["labels"] != IGNORE_INDEX).sum() == (all_unpacked != IGNORE_INDEX).sum()


def test_fit_and_pack_edges():
    def example(n, targets):
        return Encoded(list(range(1, n + 1)), [False] * (n - targets) + [True] * targets)

    exact, long, prompt_only = example(5, 2), example(6, 2), example(6, 1)
    assert fit(exact, 4, "truncate") == (exact, "kept")  # seq_len + 1 ids: seq_len (input, label) pairs
    assert fit(long, 4, "truncate") == (Encoded([1, 2, 3, 4, 5], [False] * 4 + [True]), "truncated")
    assert fit(prompt_only, 4, "truncate") == (None, "no_target")
    assert fit(long, 4, "drop") == (None, "too_long")
    sizes = [[len(e.input_ids) for e in row] for row in pack([example(n, 1) for n in (3, 3, 3, 5, 6, 1)], 6)]
    assert sizes == [[3, 3], [3], [5], [6], [1]]  # in order, never split, never over capacity
    batch = SFTExamples([[example(3, 1), example(2, 1)]], pad_id=0, packed=True).batch([0])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 3, IGNORE_INDEX, 2]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1]]


def test_split_is_deterministic_and_order_free(tokenizer, tmp_path):
    rows = alpaca_rows(40)
    cfg = SFTDataConfig(path=write_json(tmp_path, rows), val_fraction=0.1)
    val_ids = {tuple(r[0].input_ids) for r in load_sft(cfg, tokenizer)[1].rows}
    assert val_ids == {tuple(r[0].input_ids) for r in load_sft(cfg, tokenizer)[1].rows} and len(val_ids) == 4
    shuffled = random.Random(3).sample(rows, len(rows))
    cfg2 = SFTDataConfig(path=write_json(tmp_path, shuffled, "shuffled.json"), val_fraction=0.1)
    assert {tuple(r[0].input_ids) for r in load_sft(cfg2, tokenizer)[1].rows} == val_ids


def test_val_path_and_max_examples(tokenizer, tmp_path):
    cfg = SFTDataConfig(path=write_json(tmp_path, alpaca_rows(30)), val_path=write_json(tmp_path, alpaca_rows(9, 5),
                                                                                          "val.json"), max_examples=8)
    train, val, report = load_sft(cfg, tokenizer)
    assert (train.num_samples, val.num_samples, report["rows_read"]) == (8, 8, 8)


def test_report_is_logged(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llamakit.data.sft"):
        _, _, report = load_sft(SFTDataConfig(path=write_json(tmp_path, alpaca_rows(10)), val_fraction=0.1), tokenizer)
    assert json.dumps(report) in caplog.text
    assert report["train"]["target_tokens"] < report["train"]["tokens"] and report["template"] == "alpaca-v1"
