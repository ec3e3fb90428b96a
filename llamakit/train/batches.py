"""Batches for each optimizer step: a pure function of (step, rank), so a resumed run sees exactly the same data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llamakit.errors import DataError

IGNORE_INDEX = -100  # labels that take no part in the loss (F.cross_entropy's default ignore_index)


class PackedWindows:
    """Fixed windows of seq_len + 1 tokens cut from a packed token stream, shuffled per epoch with a seed.

    The LLaMA recipe packs documents (each between BOS and EOS) into one stream and trains on fixed-length
    windows, so every position carries a target and no compute goes to padding.
    """

    def __init__(self, shards, seq_len: int, seed: int, split: str = "train"):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.num_windows = (len(shards) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"the {split} split holds {len(shards)} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {seq_len + 1}; prepare more text or lower data.seq_len")
        self._order: tuple[int, np.ndarray] | None = None

    def window_at(self, sample: int) -> int:
        """Which window is the sample-th one drawn (epoch after epoch, each in its own seeded order)."""
        epoch, offset = divmod(sample, self.num_windows)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.num_windows))
        return int(self._order[1][offset])

    def batch(self, windows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Inputs and next-token labels for the given windows."""
        rows = np.stack([self.shards.window(w * self.seq_len, self.seq_len + 1) for w in windows])
        tokens = torch.from_numpy(rows.astype(np.int64))  # (B, seq_len + 1)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}  # (B, seq_len) each


@dataclass
class StepBatches:
    """Splits each global batch into this process's micro-batches.

    Global sample i of step s is number s * batch_size + i; process r takes a contiguous slice of the
    global batch. The set of samples in a step, and so the loss, does not depend on the process count.
    """

    windows: PackedWindows
    batch_size: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1

    def train_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * per_rank
        samples = [self.windows.window_at(first + i) for i in range(per_rank)]
        m = self.micro_batch_size
        return [self.windows.batch(samples[i:i + m]) for i in range(0, per_rank, m)]


def eval_batches(windows: PackedWindows, num_batches: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same validation windows at every evaluation: the first ones in stream order, split over processes."""
    total = min(windows.num_windows, num_batches * micro_batch_size)
    mine = list(range(rank, total, world_size))
    return [windows.batch(mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]
