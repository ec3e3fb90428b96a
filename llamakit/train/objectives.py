"""Training objectives: what a method computes from a batch. The loop sums `loss` and divides by `weight`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamakit.train.batches import IGNORE_INDEX


class NextTokenLoss:
    """Cross-entropy of each target token given the tokens before it (pretraining; SFT with masked labels)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token losses of the batch (the loop normalises over the whole global batch)."""
        mask = packed_mask(batch["segment_ids"]) if "segment_ids" in batch else None
        logits = model(batch["input_ids"], mask=mask)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms `loss` sums: the target tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())


def packed_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed example only: (B, 1, T, T), True where a query may look."""
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)  # (B, 1, T, T)
