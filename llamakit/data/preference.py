"""Preference data: two answers to one prompt, one preferred, for reward models, DPO and PPO's prompts.

Rows are read from JSON / JSON Lines (.gz) / Parquet files (data/sft_records.py) in three forms:
- Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript}, each "\\n\\nHuman: ...\\n\\nAssistant: ..."; the
  turns before the last assistant turn are the prompt, the two last assistant turns the answers;
- {"prompt": str | "messages": [...], "chosen": str, "rejected": str}, with an optional "margin" (a number) or a
  Llama 2 "rating" ("significantly better", "better", "slightly better", "negligibly better", "unsure");
- trl's conversational form: "chosen" and "rejected" are message lists (with the prompt in front, or in "prompt").
A row of the wrong shape is refused, named as file[index]; a row whose answers are empty, equal, or follow different
prompts (a handful in HH-RLHF) is skipped and counted.

Prompt-only data (PPO, rejection sampling) comes in the same forms: a row's prompt is its "prompt" / "messages" (a
trailing assistant turn dropped), or the prompt of its preference pair. An optional boolean "safety" marks a
safety prompt (Llama 2's reward rule).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamakit.data.sft_examples import IGNORE_INDEX
from llamakit.data.sft_records import read_records
from llamakit.errors import DataError
from llamakit.tokenizer.base import Tokenizer
from llamakit.tokenizer.chat import ChatFormatError, encode_dialog, encode_exchanges

logger = logging.getLogger(__name__)
# Llama 2 §3.2.2 (Table 28): the margin m(r) for each preference rating, small and large variants.
RATING_MARGINS = {
    "small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better": 0.0,
              "unsure": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0,
              "unsure": 0.0},
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """A dialog ending in a user turn, and the preferred and the other assistant answer to it."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass
class PreferenceReport:
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_pairs(path: str | Path, margins: str = "large") -> tuple[list[PreferencePair], PreferenceReport]:
    """Every usable pair of a preference file, and what was skipped."""
    if margins not in RATING_MARGINS:
        raise DataError(f"margins={margins!r}; choose one of {', '.join(RATING_MARGINS)}")
    report, pairs = PreferenceReport(), []
    for index, row in enumerate(read_records(path)):
        report.rows += 1
        pair = _parse(row, f"{path}[{index}]", margins)
        reason = _unusable(pair)
        if reason:
            report.skip(reason)
        else:
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no usable preference pair among {report.rows} rows (skipped: {report.skipped})")
    return pairs, report


def _parse(row: dict, where: str, margins: str) -> PreferencePair | str:
    """The row as a pair, or the reason it cannot be used; DataError for a row of the wrong shape."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and "prompt" not in row and "messages" not in row:
        return _parse_transcripts(chosen, rejected, where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _parse_conversations(row, where)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists; got "
                        f"{type(chosen).__name__} and {type(rejected).__name__}")
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    _check_messages(prompt, where, "the prompt")
    return PreferencePair(prompt, chosen, rejected, _margin(row, where, margins))


def _parse_transcripts(chosen: str, rejected: str, where: str) -> PreferencePair | str:
    """HH-RLHF: two whole transcripts that differ in their last assistant turn."""
    c, r = _hh_turns(chosen, where), _hh_turns(rejected, where)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise DataError(f"{where}: a transcript does not end with an 'Assistant:' turn")
    if c[:-1] != r[:-1]:
        return "the answers follow different prompts"
    return PreferencePair(c[:-1], c[-1]["content"], r[-1]["content"])


def _hh_turns(text: str, where: str) -> list[dict]:
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an HH-RLHF transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _parse_conversations(row: dict, where: str) -> PreferencePair | str:
    """trl's conversational form: message lists, the prompt either in front of both or in "prompt"."""
    prompt, chosen, rejected = row.get("prompt", []), row["chosen"], row["rejected"]
    for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        _check_messages(messages, where, f"'{name}'", allow_empty=name == "prompt")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'chosen' and 'rejected' must end with an assistant message")
    if prompt + chosen[:-1] != prompt + rejected[:-1]:
        return "the answers follow different prompts"
    return PreferencePair(prompt + chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _check_messages(messages: object, where: str, what: str, allow_empty: bool = False) -> None:
    if not isinstance(messages, list) or (not messages and not allow_empty) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: {what} must be a list of {{\"role\": ..., \"content\": ...}} messages")


def _margin(row: dict, where: str, margins: str) -> float:
    if "margin" in row:
        if isinstance(row["margin"], bool) or not isinstance(row["margin"], int | float):
            raise DataError(f"{where}: 'margin' must be a number, got {row['margin']!r}")
        return float(row["margin"])
    rating = row.get("rating")
    if rating is None:
        return 0.0
    table = RATING_MARGINS[margins]
    if not isinstance(rating, str) or rating.strip().lower() not in table:
        raise DataError(f"{where}: 'rating' {rating!r} is not one of {', '.join(table)}")
    return table[rating.strip().lower()]


def _unusable(pair: PreferencePair | str) -> str | None:
    if isinstance(pair, str):
        return pair
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "an answer is empty"
    if pair.chosen.strip() == pair.rejected.strip():
        return "the answers are the same"
    if not pair.prompt or pair.prompt[-1]["role"] != "user":
        return "the prompt does not end with a user turn"
    if not alternates(pair.prompt):
        return "the turns do not alternate between user and assistant"
    return None


def alternates(messages: list[dict]) -> bool:
    """user, assistant, user, ... after an optional system message (a handful of HH-RLHF dialogs have two
    assistant turns in a row, which no chat format can encode)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns))


@dataclass
class Prompt:
    """A dialog ending in a user turn, to be answered; safety: a prompt from the safety set (Llama 2 §3.2.2)."""

    messages: list[dict]
    safety: bool = False


def read_prompts(path: str | Path) -> tuple[list[Prompt], PreferenceReport]:
    """Every usable prompt of a prompt-only or preference file, and what was skipped."""
    report, prompts = PreferenceReport(), []
    for index, row in enumerate(read_records(path)):
        report.rows += 1
        where = f"{path}[{index}]"
        safety = row.get("safety", False)
        if not isinstance(safety, bool):
            raise DataError(f"{where}: 'safety' must be true or false, got {safety!r}")
        if "chosen" in row or "rejected" in row:
            pair = _parse(row, where, "large")
            messages = pair if isinstance(pair, str) else pair.prompt
        else:
            messages = row.get("messages", row.get("prompt"))
            if messages is None:
                raise DataError(f"{where}: no prompt; give \"prompt\" (a string or messages), \"messages\", or a "
                                "preference pair")
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            _check_messages(messages, where, "the prompt")
            if messages[-1]["role"] == "assistant":  # a chat example: answer its last user turn afresh
                messages = messages[:-1]
        if isinstance(messages, str):
            report.skip(messages)
        elif not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            report.skip("the prompt does not end with a user turn")
        elif not alternates(messages):
            report.skip("the turns do not alternate between user and assistant")
        else:
            prompts.append(Prompt(messages, safety))
    if not prompts:
        raise DataError(f"{path}: no usable prompt among {report.rows} rows (skipped: {report.skipped})")
    return prompts, report


def fit_prompt(tokenizer: Tokenizer, prompt: Prompt, style: str | None, max_len: int) -> Prompt:
    """The prompt without its oldest exchanges (a user turn and its answer; a system message stays) until it
    encodes to at most max_len ids, or only its last user turn is left: what a chat model is shown."""
    return _fit(tokenizer, prompt, style, max_len)[0]


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, style: str | None, max_len: int) -> tuple[list[int], bool]:
    """The ids of the prompt as fit_prompt leaves it, in the chat format up to and including the answer's header;
    a last user turn still too long keeps its last max_len ids. Also whether anything was dropped."""
    fitted, ids = _fit(tokenizer, prompt, style, max_len)
    return ids[-max_len:], len(ids) > max_len or len(fitted.messages) < len(prompt.messages)


def _fit(tokenizer: Tokenizer, prompt: Prompt, style: str | None, max_len: int) -> tuple[Prompt, list[int]]:
    """fit_prompt's prompt and its ids (each candidate encoded once)."""
    system = prompt.messages[:1] if prompt.messages[0]["role"] == "system" else []
    turns = prompt.messages[len(system):]
    ids = _encode_prompt(tokenizer, system + turns, style)
    while len(turns) > 1 and len(ids) > max_len:
        turns = turns[2:]
        ids = _encode_prompt(tokenizer, system + turns, style)
    return Prompt(system + turns, prompt.safety), ids


def _encode_prompt(tokenizer: Tokenizer, messages: list[dict], style: str | None) -> list[int]:
    try:
        return encode_dialog(tokenizer, messages, style)
    except ChatFormatError as e:
        raise DataError(f"a prompt cannot be encoded: {e}") from None


@dataclass
class EncodedPair:
    """Token ids: the prompt (its chat format's header for the answer included), then each answer with its end."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float
    truncated: bool  # the prompt lost its oldest tokens, or an answer its last ones


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair, style: str | None, max_len: int) -> EncodedPair:
    """Encode in the model's chat format and fit prompt + each answer into max_len ids: an answer keeps its first
    tokens (at least half of max_len when the prompt is long), the prompt its last."""
    try:
        prompt, chosen = prompt_and_answer(tokenizer, pair.prompt, pair.chosen, style)
        prompt_r, rejected = prompt_and_answer(tokenizer, pair.prompt, pair.rejected, style)
    except ChatFormatError as e:
        raise DataError(f"a preference prompt cannot be encoded: {e}") from None
    if prompt_r != prompt:  # tokenisation merged the prompt's end into an answer differently: split where they agree
        cut = next((i for i, (a, b) in enumerate(zip(prompt + chosen, prompt_r + rejected)) if a != b), len(prompt))
        cut = min(cut, len(prompt), len(prompt_r))
        chosen, rejected, prompt = (prompt + chosen)[cut:], (prompt_r + rejected)[cut:], prompt[:cut]
    longest = max(len(chosen), len(rejected))
    answer_room = max(max_len - len(prompt), max_len // 2)
    truncated = len(prompt) + longest > max_len
    chosen, rejected = chosen[:answer_room], rejected[:answer_room]
    keep = max_len - max(len(chosen), len(rejected))
    return EncodedPair(prompt[len(prompt) - keep:] if keep < len(prompt) else prompt, chosen, rejected, pair.margin,
                       truncated)


def prompt_and_answer(tokenizer: Tokenizer, prompt: list[dict], answer: str, style: str | None
                      ) -> tuple[list[int], list[int]]:
    """The dialog's ids before the answer, and the answer's ids with the id that ends it."""
    exchanges = encode_exchanges(tokenizer, [*prompt, {"role": "assistant", "content": answer}], style)
    before = [i for p, a in exchanges[:-1] for i in p + a] + exchanges[-1][0]
    return before, exchanges[-1][1]


@dataclass
class PreferenceDataConfig:
    """Where the preference pairs are and how to turn them into training sequences."""

    path: str = "data/preferences.jsonl"  # .json / .jsonl(.gz) / .parquet, in any of the forms above
    chat_format: str | None = None  # llama2 | llama3 | alpaca | None: the base model's, else the tokenizer's
    seq_len: int = 512  # prompt + answer ids of each sequence, at most
    margins: str = "large"  # Llama 2's rating -> margin table: small or large
    val_fraction: float = 0.05  # the last pairs (at least one) when val_path is None
    val_path: str | None = None
    max_examples: int | None = None  # only the first N usable pairs of each file
    # Llama 3's DPO: formatting tokens are not scored. The answer's header is already prompt; this drops the id
    # that ends the answer (eos, or <|eot_id|>) from the log-probabilities too.
    mask_end: bool = False


class PreferenceExamples:
    """Encoded pairs for the loop: a batch of P pairs is 2P rows, the chosen answers first (Samples protocol)."""

    def __init__(self, pairs: list[EncodedPair], pad_id: int, mask_end: bool = False):
        self.pairs, self.pad_id, self.mask_end = pairs, pad_id, mask_end
        self.num_samples = len(pairs)
        self.ref_logps: torch.Tensor | None = None  # (N, 2): the reference's log p(chosen), log p(rejected)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        picked = [self.pairs[i] for i in indices]
        rows = [(p.prompt, p.chosen) for p in picked] + [(p.prompt, p.rejected) for p in picked]
        T = max(len(prompt) + len(answer) for prompt, answer in rows) - 1
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            ids = torch.tensor(prompt + answer)
            input_ids[r, :len(ids) - 1] = ids[:-1]
            labels[r, len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]  # the answer's tokens are the targets
            if self.mask_end and len(answer) > 1:
                labels[r, len(ids) - 2] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels}  # (2P, T) each
        if self.ref_logps is not None:
            ref = self.ref_logps[list(indices)]  # (P, 2)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # (2P,)
        return batch


class RewardExamples(PreferenceExamples):
    """Pairs as a reward model reads them: whole sequences (the score is at the last token), right-padded."""

    def batch(self, indices) -> dict[str, torch.Tensor]:
        picked = [self.pairs[i] for i in indices]
        sequences = [p.prompt + p.chosen for p in picked] + [p.prompt + p.rejected for p in picked]
        T = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), T), self.pad_id, dtype=torch.long)
        for r, s in enumerate(sequences):
            input_ids[r, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in sequences])  # (2P,)
        return {"input_ids": input_ids, "last": last, "margin": torch.tensor([p.margin for p in picked])}


def load_preferences(cfg: PreferenceDataConfig, tokenizer: Tokenizer, style: str | None,
                     kind: type[PreferenceExamples] = PreferenceExamples
                     ) -> tuple[PreferenceExamples, PreferenceExamples, dict]:
    """Train and validation pairs, encoded, and a report of what was read, skipped and truncated."""
    pairs, report = read_pairs(cfg.path, cfg.margins)
    pairs = pairs[:cfg.max_examples]
    if cfg.val_path is not None:
        val_pairs, _ = read_pairs(cfg.val_path, cfg.margins)
        val_pairs = val_pairs[:cfg.max_examples]
    else:
        if len(pairs) < 2:
            raise DataError(f"{cfg.path}: {len(pairs)} usable pair(s); a validation split needs at least 2, or "
                            "give data.val_path")
        n_val = max(1, round(len(pairs) * cfg.val_fraction))
        pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
    train = [encode_pair(tokenizer, p, style, cfg.seq_len + 1) for p in pairs]
    val = [encode_pair(tokenizer, p, style, cfg.seq_len + 1) for p in val_pairs]
    summary = {"rows": report.rows, "skipped": report.skipped, "train_pairs": len(train), "val_pairs": len(val),
               "truncated": sum(e.truncated for e in train + val)}
    logger.info("preference data: %s", summary)
    return kind(train, tokenizer.pad_id, cfg.mask_end), kind(val, tokenizer.pad_id, cfg.mask_end), summary
