"""Tokenized fine-tuning examples: fitting them to seq_len, packing them, and serving padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels that take no part in the loss (F.cross_entropy's default ignore_index)
PAD_SEGMENT = -1  # segment id of padding positions in packed batches


@dataclass
class Encoded:
    """One tokenized example: its ids and which of them the model learns to predict."""

    input_ids: list[int]
    labels: list[bool]  # labels[i]: input_ids[i] is a target (predicted at position i - 1)

    @property
    def num_targets(self) -> int:
        """How many of the ids are targets."""
        return sum(self.labels)


def fit(example: Encoded, seq_len: int, truncation: str) -> tuple[Encoded | None, str]:
    """example cut (or not) to seq_len + 1 ids, and what happened: kept, truncated, too_long or no_target."""
    limit = seq_len + 1  # a row of n ids gives n - 1 (input, label) pairs
    if len(example.input_ids) <= limit:
        return example, "kept"
    if truncation == "drop":
        return None, "too_long"
    cut = Encoded(example.input_ids[:limit], example.labels[:limit])
    return (cut, "truncated") if cut.num_targets else (None, "no_target")


def pack(examples: Sequence[Encoded], capacity: int) -> list[list[Encoded]]:
    """Whole examples, in order, gathered into rows of at most capacity ids (a new row when the next does not fit)."""
    rows: list[list[Encoded]] = []
    used = capacity  # forces a first row
    for example in examples:
        if used + len(example.input_ids) > capacity:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.input_ids)
    return rows


class SFTExamples:
    """Rows of one or more examples served as right-padded batches (the training loop's Samples protocol).

    A row of n ids gives n - 1 positions: input_ids[t] = ids[t] and labels[t] = ids[t + 1] when that id is a
    target of the same example, else IGNORE_INDEX. With packing, segment_ids[t] numbers the example (0, 1, ...)
    that position t belongs to, and padding gets PAD_SEGMENT (-1), so attention can be kept within examples.
    """

    def __init__(self, rows: list[list[Encoded]], pad_id: int, packed: bool = False):
        self.rows, self.pad_id, self.packed = rows, pad_id, packed
        self.num_samples = len(rows)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """input_ids and labels (B, T), plus segment_ids (B, T) when packed; T is the longest row's length - 1."""
        rows = [_flatten(self.rows[i]) for i in indices]
        width = max(len(ids) for ids, _, _ in rows) - 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
        segment_ids = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.int64)  # (B, T)
        for b, (ids, targets, segments) in enumerate(rows):
            n = len(ids) - 1
            keep = targets[1:] & (segments[1:] == segments[:-1])  # (n,) never across a packed boundary
            input_ids[b, :n] = ids[:-1]
            labels[b, :n] = torch.where(keep, ids[1:], IGNORE_INDEX)
            segment_ids[b, :n] = segments[:-1]
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packed:
            batch["segment_ids"] = segment_ids
        return batch

    def __len__(self) -> int:
        return self.num_samples


def _flatten(row: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ids, target flags and segment numbers of a row's examples laid end to end, each (n,)."""
    ids = torch.tensor([i for e in row for i in e.input_ids], dtype=torch.int64)
    targets = torch.tensor([t for e in row for t in e.labels], dtype=torch.bool)
    segments = torch.tensor([s for s, e in enumerate(row) for _ in e.input_ids], dtype=torch.int64)
    return ids, targets, segments
