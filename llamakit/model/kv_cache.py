"""The KV cache: keys and values of past tokens for every layer, owned by the caller and passed into the model.

It holds `max_slots` sequences (slots), each with its own length. `model(tokens, cache, slots)` appends
tokens (B, T) to the given slots: their keys and values are written after each slot's current length
and every query sees its own slot's earlier tokens. Which slots a forward touches is up to the caller,
so a new request can be prefilled into a free slot while other slots hold live sequences, and a slot
can be rolled back (speculative decoding) or released for reuse by changing a length, not the data.
Lengths live on the host, so no step waits for the device to learn them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamakit.errors import LlamakitError
from llamakit.model.config import ModelConfig


class KVCache:
    """Keys and values (n_layers, max_slots, KV, max_seq_len, D), written in place, and each slot's length."""

    def __init__(self, config: ModelConfig, max_slots: int, max_seq_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", kv_heads: int | None = None):
        if max_slots < 1:
            raise LlamakitError(f"a KV cache needs at least 1 slot, got max_slots={max_slots}")
        heads = kv_heads or config.kv_heads  # fewer under tensor parallelism: this process's share
        shape = (config.n_layers, max_slots, heads, max_seq_len or config.max_seq_len, config.head_dim)
        # Zeros, not empty: a masked-out key still multiplies its value by 0, and 0 * nan is nan.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * max_slots  # tokens held by each slot
        self._free = list(range(max_slots))  # slots nobody holds, handed out lowest first

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_slots: int, max_seq_len: int | None = None) -> KVCache:
        """A cache in the dtype and on the device of the model's weights, for the key/value heads its attention
        layers compute (all of them, or a tensor-parallel process's share)."""
        weight = model.embed_tokens.weight
        return cls(model.config, max_slots, max_seq_len, dtype=weight.dtype, device=weight.device,
                   kv_heads=model.layers[0].self_attn.n_kv_heads)

    @property
    def max_slots(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(3)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        """Take a free slot (empty, length 0) and return its index."""
        if not self._free:
            raise LlamakitError(f"all {self.max_slots} KV cache slots are in use; release one or build a cache with "
                                "more slots")
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back: its tokens are forgotten and it can be acquired again."""
        if slot in self._free:
            raise LlamakitError(f"KV cache slot {slot} is not in use")
        self.lengths[slot] = 0
        self._free.append(slot)

    def rollback(self, slot: int, k: int) -> None:
        """Forget the last k tokens of a slot (rejected draft tokens); the next ones overwrite them."""
        if not 0 <= k <= self.lengths[slot]:
            raise LlamakitError(f"cannot roll KV cache slot {slot} back by {k}: it holds {self.lengths[slot]} tokens")
        self.lengths[slot] -= k

    def view(self, slots: Sequence[int], T: int) -> CacheView:
        """Where T new tokens for each of `slots` go; the model calls this, then `append` once it has run."""
        return CacheView(self, list(slots), T)

    def append(self, slots: Sequence[int], T: int) -> None:
        for slot in slots:
            self.lengths[slot] += T


class CacheView:
    """One forward's part of the cache: each row's positions, its attention mask and each layer's update."""

    def __init__(self, cache: KVCache, slots: list[int], T: int):
        B, starts = len(slots), [cache.lengths[s] for s in slots]
        self.cache, self.slots, self.T = cache, slots, T
        self.end = max(starts) + T  # keys past this are nobody's yet
        if len(set(slots)) != B or self.end > cache.max_seq_len:
            self._refuse(starts)
        device = cache.k.device
        self.uniform = len(set(starts)) == 1
        first = slots[0]
        contiguous = slots == list(range(first, first + B))
        # Rows at one position in slots first..first+B-1 are written as one block and read as a view; otherwise
        # each row is written at its own positions, and any other set of slots is gathered (a copy).
        index = None if self.uniform and contiguous else torch.tensor(slots, device=device)  # (B,)
        self.rows = slice(first, first + B) if contiguous else index
        self.write_rows = None if index is None else index[:, None]  # (B, 1)
        offsets = torch.arange(T, device=device)
        if self.uniform:
            self.start = starts[0]
            self.positions = self.start + offsets  # (T,)
            # One new token sees every key; a fresh prompt is plain causal; anything else needs a mask.
            self.mask = None if T == 1 or self.start == 0 else (
                torch.arange(self.end, device=device) <= self.positions[:, None])  # (T, S)
        else:
            self.positions = torch.tensor(starts, device=device)[:, None] + offsets  # (B, T)
            visible = torch.arange(self.end, device=device) <= self.positions[..., None]  # (B, T, S)
            self.mask = visible[:, None]  # (B, 1, T, S)

    def _refuse(self, starts: list[int]) -> None:
        if len(set(self.slots)) != len(self.slots):
            raise LlamakitError(f"KV cache slots {self.slots} repeat a slot; pass each slot once")
        slot = self.slots[starts.index(max(starts))]
        raise LlamakitError(f"KV cache overflow: slot {slot} holds {max(starts)} tokens and {self.T} more do not fit "
                            f"its {self.cache.max_seq_len} positions; build the cache with a larger max_seq_len")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new k, v (B, KV, T, D); return the keys and values its queries attend over."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (max_slots, KV, max_seq_len, D)
        if self.write_rows is None:
            ck[self.rows, :, self.start:self.end] = k
            cv[self.rows, :, self.start:self.end] = v
        else:
            positions = self.positions.expand(len(self.slots), -1)  # (B, T)
            ck[self.write_rows, :, positions] = k.transpose(1, 2)  # indexed as (B, T, KV, D)
            cv[self.write_rows, :, positions] = v.transpose(1, 2)
        return ck[self.rows, :, :self.end], cv[self.rows, :, :self.end]  # (B, KV, S, D)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


class LayerCache:
    """What one attention layer sees of the cache: `update(k, v)` stores the new keys/values, returns all."""

    def __init__(self, view: CacheView, layer: int):
        self.view, self.index = view, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.update(self.index, k, v)
