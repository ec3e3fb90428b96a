"""A pre-allocated key/value cache for one attention layer."""

from __future__ import annotations

import torch
from torch import nn

from llamakit.errors import LlamakitError


class KVCache(nn.Module):
    """Keys and values of past positions, (max_batch_size, KV, max_seq_len, D), written in place."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.k.size(0)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at slots start_pos..; return the keys/values of the slots so far.

        A (B,) tensor start_pos writes each row at its own slot and returns all slots (B, KV, max_seq_len, D);
        the caller's attention mask says which of them each row may see.
        """
        B, _, T, _ = k.shape
        if isinstance(start_pos, int):
            self._check_fits(B, start_pos, start_pos + T)
            self.k[:B, :, start_pos:start_pos + T] = k
            self.v[:B, :, start_pos:start_pos + T] = v
            return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]  # (B, KV, S, D)
        # Per-row slots: the caller (the decode loop) keeps them in range; checking here would sync the device.
        self._check_fits(B, 0, T)
        slots = (start_pos[:, None] + torch.arange(T, device=k.device))[:, None, :, None].expand_as(k)  # (B, KV, T, D)
        self.k[:B].scatter_(2, slots, k)
        self.v[:B].scatter_(2, slots, v)
        return self.k[:B], self.v[:B]  # (B, KV, max_seq_len, D)

    def _check_fits(self, B: int, start: int, end: int) -> None:
        if self.max_batch_size < B or end > self.max_seq_len:
            raise LlamakitError(
                f"KV cache overflow: batch {B} x positions {start}..{end - 1} does not fit the cache "
                f"({self.max_batch_size} x {self.max_seq_len}); call setup_kv_cache with a larger "
                "max_batch_size/max_seq_len")
