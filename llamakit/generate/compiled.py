"""A compiled decode step: `decode_one` with static shapes, so `torch.compile` builds it once per batch bucket.

Eager decoding attends over each slot's tokens so far, so the attended length (and with it every shape in
attention) grows by one each step; a compiled graph would be rebuilt every step. Here every step attends
over the cache's whole max_seq_len with a mask built from the slots' lengths (tensors, not Python ints), and
runs the slots 0..n-1 of the smallest bucket n (1, 2, 4, 8, ... capped at max_slots) that holds every live
slot: a slot without a token this step is a padding row whose cache write puts back what is there already.
The shapes then depend only on the bucket and the cache's shape: one compile each (`static_cache` sizes a
cache so that calls with different prompts share one shape). The model itself is unchanged: the step hands
it a cache object (`StaticCache`) whose view writes at per-row positions given as tensors.

Costs: the first step of each bucket compiles (seconds to a minute on CPU; `warm_up` compiles them all ahead, as
`llamakit serve --compile` does before it reports ready), and every step attends over all max_seq_len positions,
however few are filled, so keep the cache no larger than needed. Prefill stays eager: a compiled static-shape
chunk measured on CPU was no faster with a cache as long as the prompt (the matmuls dominate and run in the same
kernels) and 10-35% slower with a longer one (it attends over the whole cache, eager only over the tokens so far).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.cpu_linear import decode_threads
from llamakit.model import KVCache, Transformer

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256  # compiled graphs of _static_step a process may hold (see CompiledDecode._step)
LIMIT_NAMES = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
SEQ_MULTIPLE = 256  # static_cache rounds max_seq_len up to a multiple of this: few shapes, little waste


def bucket(slots_needed: int, max_slots: int) -> int:
    """The smallest power of two >= slots_needed, at most max_slots."""
    return min(1 << (slots_needed - 1).bit_length(), max_slots)


def buckets(max_slots: int) -> list[int]:
    """Every bucket a cache of max_slots slots can run: 1, 2, 4, ... and max_slots itself."""
    return sorted({bucket(n, max_slots) for n in range(1, max_slots + 1)})


def static_cache(model: Transformer, slots: int, seq_len: int) -> KVCache:
    """A cache for the compiled step: slots rounded up to a bucket, seq_len up to a multiple of SEQ_MULTIPLE
    (not beyond the model's max_seq_len unless seq_len is), so that nearby requests reuse one compiled graph."""
    rounded = -(-seq_len // SEQ_MULTIPLE) * SEQ_MULTIPLE
    return KVCache.for_model(model, bucket(slots, 1 << 30), max(seq_len, min(rounded, model.config.max_seq_len)))


class StaticView:
    """A forward's view of the cache in static shapes: rows are slots 0..B-1, each appending one token at
    `positions` (B,), attending over all max_seq_len positions up to its own; rows not `valid` write nothing."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        self.k, self.v, self.valid = k, v, valid
        B, S = positions.size(0), k.size(3)
        self.rows = torch.arange(B, device=k.device)  # (B,)
        self.write_at = positions  # (B,)
        self.positions = positions[:, None]  # (B, T=1): per-row RoPE positions
        self.mask = (torch.arange(S, device=k.device) <= positions[:, None])[:, None, None]  # (B, 1, 1, S)

    def layer(self, i: int) -> StaticLayer:
        return StaticLayer(self, i)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new k, v (B, KV, 1, D) at each row's position; return its keys/values (B, KV, S, D)."""
        B, keep = self.rows.size(0), self.valid[:, None, None]  # (B, 1, 1)
        # Index the whole cache tensor (the layer as a tensor too): inductor then writes into it in place,
        # where a write through a view of it (k[layer]) makes it copy the layer's cache every step.
        at = (torch.full_like(self.rows, layer), self.rows, slice(None), self.write_at)
        for cache, new in ((self.k, k), (self.v, v)):
            cache[at] = torch.where(keep, new[:, :, 0], cache[at])  # (B, KV, D)
        return self.k[layer, :B], self.v[layer, :B]  # (B, KV, S, D): views, no copy


class StaticLayer:
    def __init__(self, view: StaticView, layer: int):
        self.view, self.index = view, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.update(self.index, k, v)


class StaticCache:
    """Stands in for a KVCache inside the compiled step: the model asks it for a view and to record the append
    (which the caller does on the host, outside the graph)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        self._view = StaticView(k, v, positions, valid)

    def view(self, slots: Sequence[int], T: int) -> StaticView:
        return self._view

    def append(self, slots: Sequence[int], T: int) -> None:
        pass


def _static_step(model: Transformer, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after appending tokens (B,) to slots 0..B-1 at positions (B,); the function compiled."""
    return model(tokens[:, None], StaticCache(k, v, positions, valid))[:, -1]  # (B, V)


class CompiledDecode:
    """A drop-in for `decode_one` (same arguments, same result) that runs a torch.compile'd static-shape step.

    mode: torch.compile's mode; by default "reduce-overhead" (CUDA graphs) on CUDA, and elsewhere inductor's
    default with its C++ wrapper: a tiny model's step is mostly the Python wrapper's per-kernel overhead, which
    that removes (stories260K: ~320 -> ~220 us a step on one thread) for a longer compile.
    """

    def __init__(self, model: Transformer, mode: str | None = None):
        self.model, self.mode = model, mode
        self._compiled: dict[str, object] = {}  # by device type

    def cache(self, slots: int, seq_len: int) -> KVCache:
        """A cache of at least `slots` slots and `seq_len` positions, in shapes nearby requests share."""
        return static_cache(self.model, slots, seq_len)

    @torch.inference_mode()
    def __call__(self, model: Transformer, cache: KVCache, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        B, device = bucket(max(slots) + 1, cache.max_slots), cache.k.device
        index = torch.tensor(slots, device=device)  # (F,)
        padded = torch.zeros(B, dtype=tokens.dtype, device=device).index_copy_(0, index, tokens)  # (B,)
        # Rows without a token still need an in-range position; min(length, S - 1) is one (they write nothing).
        positions = torch.tensor([min(n, cache.max_seq_len - 1) for n in cache.lengths[:B]], device=device)  # (B,)
        if len(set(slots)) < len(slots) or any(cache.lengths[s] >= cache.max_seq_len for s in slots):
            cache.view(slots, 1)  # a repeated or full slot: raises the error eager decoding gives
        valid = torch.zeros(B, dtype=torch.bool, device=device).index_fill_(0, index, True)  # (B,)
        if device.type == "cuda":  # CUDA graphs keep the cache in place only if its address is static
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        with decode_threads(model, B):  # one row through OpenBLAS (cpu_linear): torch on one thread, compile too
            logits = self._step(device)(model, cache.k, cache.v, padded, positions, valid)
        cache.append(slots, 1)
        return logits.index_select(0, index)  # (F, V): a copy, so a CUDA graph's next replay cannot overwrite it

    def warm_up(self, cache: KVCache) -> list[int]:
        """Compile the step now for every bucket `cache` can run (1, 2, 4, ... up to its slots), so that no request
        waits for a compile later (a server does this before it reports ready); return the buckets.

        The cache must be empty: each compile appends a token to one slot, and releasing the slots forgets it.
        """
        if cache.free_slots != cache.max_slots:
            raise LlamakitError("warm_up needs an empty KV cache; warm up before taking any slot")
        slots = [cache.acquire() for _ in range(cache.max_slots)]
        token = torch.zeros(1, dtype=torch.long, device=cache.k.device)  # (1,)
        try:
            for b in buckets(cache.max_slots):
                start = time.perf_counter()
                self(self.model, cache, [b - 1], token)  # slot b-1 alone: runs bucket b
                log.info("compiled the decode step for batch bucket %d in %.1f s", b, time.perf_counter() - start)
        finally:
            for slot in slots:
                cache.release(slot)
        return buckets(cache.max_slots)

    def _step(self, device: torch.device):
        if device.type not in self._compiled:
            # dynamo keeps one entry per bucket and cache shape for the one _static_step code object, shared by
            # every CompiledDecode in the process (models, drafts, configs): its default limit of 8 fails a
            # server with many buckets, or a process that compiles several models.
            limits = torch._dynamo.config
            for name in LIMIT_NAMES:  # names differ between torch releases; some read as aliases but refuse writes
                with contextlib.suppress(AttributeError):
                    setattr(limits, name, max(getattr(limits, name), RECOMPILE_LIMIT))
            mode = self.mode or ("reduce-overhead" if device.type == "cuda" else None)
            options = {"cpp_wrapper": True} if mode is None and device.type == "cpu" else None
            self._compiled[device.type] = torch.compile(_static_step, dynamic=False, fullgraph=True, mode=mode,
                                                        options=options)
        return self._compiled[device.type]
