"""Batches for each optimizer step: a pure function of (step, rank), so a resumed run sees exactly the same data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from llamakit.data.sft_examples import IGNORE_INDEX  # noqa: F401 (the objectives import it from here)
from llamakit.errors import DataError


class Samples(Protocol):
    """A training set the loop draws from: packed windows (pretraining) or examples (fine-tuning)."""

    num_samples: int

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """input_ids (B, T) and labels (B, T), labels[t] the target after input_ids[t] or IGNORE_INDEX."""


class EpochOrder:
    """Which item the sample-th draw of a run takes: epoch after epoch, each in its own seeded permutation."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __call__(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.size)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.size))
        return int(self._order[1][offset])


class PackedWindows:
    """Fixed windows of seq_len + 1 tokens cut from a packed token stream.

    The LLaMA recipe packs documents (each between BOS and EOS) into one stream and trains on fixed-length
    windows, so every position carries a target and no compute goes to padding.
    """

    def __init__(self, shards, seq_len: int, split: str = "train"):
        self.shards, self.seq_len = shards, seq_len
        self.num_samples = (len(shards) - 1) // seq_len
        if self.num_samples < 1:
            more = "a larger --val-fraction" if split == "val" else "more text"
            raise DataError(f"the {split} split holds {len(shards)} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {seq_len + 1}; prepare {more} or lower data.seq_len")

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

    samples: Samples
    batch_size: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self):
        self.order = EpochOrder(self.samples.num_samples, self.seed)

    def train_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * per_rank
        picked = [self.order(first + i) for i in range(per_rank)]
        m = self.micro_batch_size
        return [self.samples.batch(picked[i:i + m]) for i in range(0, per_rank, m)]


def eval_batches(samples: Samples, num_batches: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same validation samples at every evaluation: the first ones in order, split over processes.

    Every process gets as many samples (so as many forward passes: FSDP needs them all to take part).
    """
    total = min(samples.num_samples, num_batches * micro_batch_size)
    total -= total % world_size
    if total == 0 and samples.num_samples < world_size:
        raise DataError(f"the validation split holds {samples.num_samples} sample(s), fewer than the {world_size} "
                        "processes; give it more examples (a larger val fraction, or a validation file)")
    if total == 0:
        raise DataError(f"eval.batches={num_batches} micro-batches of {micro_batch_size} give fewer validation samples "
                        f"than the {world_size} data-parallel processes; raise eval.batches to at least "
                        f"{-(-world_size // micro_batch_size)}")
    mine = list(range(rank, total, world_size))
    return [samples.batch(mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]
