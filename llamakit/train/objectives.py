"""Training objectives: what a method computes from a batch. A new method is a new objective plus a data adapter.

The loop sums `loss` over micro-batches and processes and divides by the summed `weight`; it does the same
with each of the objective's own metrics, and counts `tokens` for tokens/s and MFU.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llamakit.train.batches import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """What the loop needs from a training method (pretraining, SFT, DPO, reward modelling, ...)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of the batch, and the objective's own metrics, each summed over the batch too
        (the loop divides both by the global weight)."""

    def weight(self, batch: Batch) -> float:
        """How many terms `loss` sums (target tokens, preference pairs): what the loss is normalised by."""

    def tokens(self, batch: Batch) -> int:
        """Tokens the model processes for this batch, for tokens/s, MFU and tokens_seen."""


class NextTokenLoss:
    """Cross-entropy of each target token given the tokens before it (pretraining; SFT with masked labels)."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed token losses of the batch (the loop normalises over the whole global batch); no metrics of its own."""
        mask = packed_mask(batch["segment_ids"]) if "segment_ids" in batch else None
        logits = model(batch["input_ids"], mask=mask)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum"), {}

    def weight(self, batch: Batch) -> int:
        """How many terms `loss` sums: the target tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Batch) -> int:
        """Every input position the forward pass computes (SFT's prompt and padding included)."""
        return batch["input_ids"].numel()


def packed_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed example only: (B, 1, T, T), True where a query may look."""
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)  # (B, 1, T, T)
