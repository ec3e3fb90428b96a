"""Supervised fine-tuning data: Alpaca instructions and multi-turn chats, tokenized with the loss on responses only.

Each example is one token sequence whose response ids are marked as targets; the prompt (and for chats every
system and user turn and the role headers) is context only. Examples longer than seq_len + 1 ids are cut or
dropped (truncation = truncate | drop) and counted in the report. With packing, whole examples share a row and
segment_ids tell them apart, so the objective can keep attention inside each example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass

from tqdm import tqdm

from llamakit.data.sft_examples import IGNORE_INDEX, PAD_SEGMENT, Encoded, SFTExamples, fit, pack
from llamakit.data.sft_records import check_alpaca_row, check_chat_row, detect_format, read_records
from llamakit.errors import DataError
from llamakit.tokenizer.base import Tokenizer
from llamakit.tokenizer.chat import (
    CHAT_STYLES,
    ChatFormatError,
    alpaca_prompt,
    common_prefix,
    default_style,
    encode_exchanges,
    stop_ids_for,
)

__all__ = ["ALPACA_TEMPLATE_VERSION", "IGNORE_INDEX", "PAD_SEGMENT", "Encoded", "SFTDataConfig", "SFTExamples",
           "encode_alpaca", "encode_chat", "load_sft", "read_records", "render_alpaca"]

logger = logging.getLogger(__name__)

ALPACA_TEMPLATE_VERSION = "alpaca-v1"  # Stanford Alpaca's prompt, with and without an input (tokenizer.chat)
FORMATS = ("auto", "alpaca", "chat")
TRUNCATIONS = ("truncate", "drop")


@dataclass
class SFTDataConfig:
    """Where the fine-tuning rows are and how to turn them into training sequences."""

    path: str = "data/alpaca.json"  # a .json / .jsonl(.gz) / .parquet file
    format: str = "auto"  # alpaca | chat | auto (chat when rows have messages_field, alpaca when `instruction`)
    messages_field: str = "messages"
    chat_format: str | None = None  # llama2 | llama3 | alpaca | None: the tokenizer's default
    seq_len: int = 512  # input positions per row; an example may have seq_len + 1 ids
    truncation: str = "truncate"  # truncate: keep the first seq_len + 1 ids (dropped if no target is left) | drop
    packing: bool = False
    val_fraction: float = 0.05  # the rows with the smallest content hashes (at least one) when val_path is None
    val_path: str | None = None
    max_examples: int | None = None  # only the first N rows of each file


@dataclass
class SplitReport:
    """What happened to one split's rows."""

    rows: int = 0
    examples: int = 0  # kept, truncated ones included
    truncated: int = 0
    dropped_too_long: int = 0  # truncation = drop
    dropped_no_target: int = 0  # truncation = truncate, but the cut left no target id
    packed_rows: int | None = None  # rows of packed examples, when packing
    tokens: int = 0  # ids of the kept examples
    target_tokens: int = 0


def render_alpaca(record: dict) -> tuple[str, str]:
    """(prompt, response) in the Stanford Alpaca template; prompt + response is the canonical `text`."""
    check_alpaca_row("the record", record)
    return alpaca_prompt(record["instruction"], record.get("input") or ""), record["output"]


def encode_alpaca(tokenizer: Tokenizer, record: dict) -> Encoded:
    """BOS + prompt ids (context) + response ids + EOS (targets)."""
    prompt, response = render_alpaca(record)
    ids = tokenizer.encode(prompt + response, bos=True, eos=True)
    # The response is tokenized in context (as the model would generate it); it starts where the prompt's ids end.
    cut = common_prefix(tokenizer.encode(prompt, bos=True), ids)
    return Encoded(ids, [False] * cut + [True] * (len(ids) - cut))


def encode_chat(tokenizer: Tokenizer, messages: list[dict], style: str | None = None) -> Encoded:
    """The whole dialog; targets are each assistant message's content ids and its end id, nothing else."""
    ids: list[int] = []
    labels: list[bool] = []
    for prompt, reply in encode_exchanges(tokenizer, messages, style):
        ids += prompt + reply
        labels += [False] * len(prompt) + [True] * len(reply)
    return Encoded(ids, labels)


def load_sft(cfg: SFTDataConfig, tokenizer: Tokenizer) -> tuple[SFTExamples, SFTExamples, dict]:
    """Train and validation examples from cfg's files, and a report of what was read, cut, dropped and packed."""
    _check_config(cfg)
    rows = _read(cfg.path, cfg.max_examples)
    fmt = detect_format([r for _, r in rows], cfg.messages_field, cfg.path) if cfg.format == "auto" else cfg.format
    style = _chat_style(cfg, tokenizer) if fmt == "chat" else None
    val_rows = None if cfg.val_path is None else _read(cfg.val_path, cfg.max_examples)
    for where, row in rows + (val_rows or []):  # every row checked before any is split off, in file order
        _check_row(where, row, fmt, cfg.messages_field)
    train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.path) if val_rows is None else (rows, val_rows)
    report = {"path": cfg.path, "val_path": cfg.val_path, "format": fmt, "chat_format": style,
              "template": ALPACA_TEMPLATE_VERSION if fmt == "alpaca" else None, "seq_len": cfg.seq_len,
              "truncation": cfg.truncation, "packing": cfg.packing, "rows_read": len(rows)}
    splits = {}
    for name, split, source in (("train", train_rows, cfg.path), ("val", val_rows, cfg.val_path or cfg.path)):
        examples, stats = _encode_split(name, source, split, cfg, tokenizer, fmt, style)
        splits[name] = _examples(examples, cfg, tokenizer)
        stats.packed_rows = splits[name].num_samples if cfg.packing else None
        report[name] = asdict(stats)
    logger.info("fine-tuning data %s", json.dumps(report))
    return splits["train"], splits["val"], report


def _examples(examples: list[Encoded], cfg: SFTDataConfig, tokenizer: Tokenizer) -> SFTExamples:
    """The examples one per row, or packed several to a row when cfg.packing."""
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    rows = pack(examples, cfg.seq_len + 1) if cfg.packing else [[example] for example in examples]
    return SFTExamples(rows, pad_id, cfg.packing)


def _check_config(cfg: SFTDataConfig) -> None:
    """DataError for settings that cannot work, naming the setting and its allowed values."""
    if cfg.format not in FORMATS:
        raise DataError(f"unknown fine-tuning data format {cfg.format!r}; use one of {', '.join(FORMATS)}")
    if cfg.truncation not in TRUNCATIONS:
        raise DataError(f"unknown truncation {cfg.truncation!r}; use truncate (cut over-long examples) or drop "
                        "(skip them)")
    if cfg.seq_len < 1:
        raise DataError(f"seq_len is {cfg.seq_len}; it must be at least 1")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise DataError(f"max_examples is {cfg.max_examples}; use a positive number, or None for every row")
    if cfg.val_path is None and not 0 < cfg.val_fraction < 1:
        raise DataError(f"val_fraction is {cfg.val_fraction}, which leaves the train or validation split empty; "
                        "use a fraction between 0 and 1 (e.g. 0.05), or give a val_path")


def _read(path: str, max_examples: int | None) -> list[tuple[str, dict]]:
    """(where, row) for the first max_examples rows of path; `where` names the row in errors."""
    rows = read_records(path)[:max_examples]
    return [(f"{path}[{index}]", row) for index, row in enumerate(rows)]


def _chat_style(cfg: SFTDataConfig, tokenizer: Tokenizer) -> str:
    """The configured chat style, or the tokenizer's default; DataError when the tokenizer cannot use it."""
    style = cfg.chat_format or default_style(tokenizer)
    if style not in CHAT_STYLES:
        raise DataError(f"unknown chat_format {style!r}; use one of {', '.join(CHAT_STYLES)}, or leave it unset for "
                        "the tokenizer's default")
    try:
        stop_ids_for(tokenizer, style)  # fails when a llama3 dialog meets a tokenizer without its header tokens
    except ChatFormatError as err:
        raise DataError(f"chat_format {style!r}: {err}") from None
    return style


def split_rows(rows: list, val_fraction: float, path: str) -> tuple[list, list]:
    """(train, val): val is the ceil(fraction * n) rows with the smallest content hashes, both in file order.

    A hash of the content, not a position, picks each row, so the split does not depend on row order or on
    rows added later, and identical rows land in the same split.
    """
    count = math.ceil(val_fraction * len(rows))
    if count >= len(rows):
        raise DataError(f"{path} has {len(rows)} row(s), too few to hold out val_fraction = {val_fraction} and "
                        "still train; add rows, lower val_fraction, or give a val_path")
    ranked = sorted(range(len(rows)), key=lambda i: (_row_hash(rows[i][1]), i))
    held_out = set(ranked[:count])
    return ([r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out])


def _row_hash(row: dict) -> bytes:
    """A digest of the row's content that does not depend on key order."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).digest()


def _encode_split(name: str, source: str, rows: list[tuple[str, dict]], cfg: SFTDataConfig, tokenizer: Tokenizer,
                  fmt: str, style: str | None) -> tuple[list[Encoded], SplitReport]:
    """The split's rows tokenized and fitted to seq_len, and the counts of what happened to them."""
    examples, stats = [], SplitReport(rows=len(rows))
    for _, row in tqdm(rows, desc=f"tokenizing {name}", unit="example", disable=None, leave=False):
        example, outcome = fit(_encode_row(row, cfg, tokenizer, fmt, style), cfg.seq_len, cfg.truncation)
        stats.truncated += outcome == "truncated"
        stats.dropped_too_long += outcome == "too_long"
        stats.dropped_no_target += outcome == "no_target"
        if example is None:
            continue
        stats.tokens += len(example.input_ids)
        stats.target_tokens += example.num_targets
        examples.append(example)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no {name} example is left from {source}: {stats.dropped_too_long} "
                        f"longer than seq_len + 1 = {cfg.seq_len + 1} ids were dropped and {stats.dropped_no_target} "
                        "lost every response id when cut; raise seq_len"
                        + (", or use truncation=truncate" if cfg.truncation == "drop" else ""))
    return examples, stats


def _check_row(where: str, row: dict, fmt: str, messages_field: str) -> None:
    """DataError naming the row unless it has the fields its format needs."""
    if fmt == "alpaca":
        check_alpaca_row(where, row)
    else:
        check_chat_row(where, row, messages_field)


def _encode_row(row: dict, cfg: SFTDataConfig, tokenizer: Tokenizer, fmt: str, style: str | None) -> Encoded:
    """One checked row tokenized in its format."""
    if fmt == "alpaca":
        return encode_alpaca(tokenizer, row)
    return encode_chat(tokenizer, row[cfg.messages_field], style)
