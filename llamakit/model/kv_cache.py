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

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at positions start_pos..; return all keys/values so far (B, KV, S, D)."""
        B, _, T, _ = k.shape
        max_batch, _, max_len, _ = self.k.shape
        end = start_pos + T
        if B > max_batch or end > max_len:
            raise LlamakitError(
                f"KV cache overflow: batch {B} x positions {start_pos}..{end - 1} does not fit the cache "
                f"({max_batch} x {max_len}); call setup_kv_cache with a larger max_batch_size/max_seq_len")
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, KV, S, D)
