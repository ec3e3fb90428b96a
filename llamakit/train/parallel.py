"""Parallelism, applied to an existing model from outside (the model knows nothing of it); the processes and
their (pp, dp, tp) DeviceMesh come from llamakit.runtime.

Order, as torchtitan applies it: the pipeline split (pipeline.py: this process keeps its stage's layers) -> tensor
parallelism (model/tensor_parallel.py: each layer split over the "tp" processes, sequence-parallel norms, logits
split on the vocabulary) -> activation checkpointing -> torch.compile -> data parallelism over the "dp" processes
(FSDP2 `fully_shard` per block, then the root; or DDP).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from llamakit import runtime
from llamakit.errors import ConfigError
from llamakit.model.tensor_parallel import VOCAB, apply_tensor_parallel, blocks, check_tensor_parallel
from llamakit.runtime import Processes, close_processes  # noqa: F401 (imported from here by the runner)
from llamakit.train.config import TrainSection
from llamakit.train.pipeline import attach_pipeline, split_stage

log = logging.getLogger(__name__)


def init_processes(device: str = "auto") -> Processes:
    """runtime.init_processes, its errors naming the training config's setting."""
    return runtime.init_processes(device, "train.device")


def keep_freed_memory() -> None:
    """On CPU, stop glibc returning large freed blocks to the OS after every step.

    Logits, their gradients and the embedding gradient are hundreds of MB, freed and re-allocated every
    step; by default glibc unmaps them and the next step faults them back in 4 KiB at a time, which costs
    about 20% of a small model's step (benchmarks/train.py). The price: resident memory stays at its peak.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)


def parallelize(model: nn.Module, cfg: TrainSection, procs: Processes) -> nn.Module:
    """Apply the pipeline split, tensor parallelism, activation checkpointing, compile and data parallelism to
    `model`, in that order."""
    if procs.pp > 1:  # pipeline parallel: this process keeps its stage's layers; the rest applies to it (pipeline.py)
        model = split_stage(model, procs)
    if procs.tp > 1:
        tensor_parallel(model, procs)
    if cfg.activation_checkpointing:
        for block in blocks(model):
            # Recompute each block's activations in backward instead of storing them (LLaMA §2.4).
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if cfg.compile:
        for block in blocks(model):
            block.compile()
    if procs.dp == 1:
        return attach_pipeline(model, cfg, procs)
    if _data_parallel_kind(cfg, model) == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = runtime.device_mesh(procs)["dp"] if procs.dp < procs.world_size else None  # None: every process
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return attach_pipeline(model, cfg, procs)
    if not any(p.requires_grad for p in model.parameters()):
        return model  # a frozen model (a reference, a reward model) has no gradients for DDP to average
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)


def tensor_parallel(model: nn.Module, procs: Processes) -> None:
    """Split every layer over the tensor-parallel processes (model/tensor_parallel.py) with sequence-parallel norms
    and logits left split on the vocabulary: the loss is computed under `loss_parallel` (runner.py), so no process
    holds the whole (B, T, vocab) logits."""

    config = model.config
    check_tensor_parallel(config, procs.tp, training=True)
    if config.vocab_size % procs.tp:
        raise ConfigError(f"train.tensor_parallel={procs.tp} must divide vocab_size={config.vocab_size}: the output "
                          "head and the loss are split on the vocabulary")
    apply_tensor_parallel(model, runtime.device_mesh(procs)["tp"], embedding_dim=VOCAB, sequence_parallel=True,
                          loss_parallel=True)


def _data_parallel_kind(cfg: TrainSection, model: nn.Module) -> str:
    # Prompt tuning runs the soft prompt through every block before the root's forward, which FSDP's
    # per-block gathering does not allow; its few trainable parameters gain nothing from sharding anyway.
    if hasattr(model, "soft_prompt"):
        if cfg.parallel == "fsdp":
            raise ConfigError("prompt tuning runs with DDP: set train.parallel to ddp or auto")
        return "ddp"
    if cfg.parallel in ("fsdp", "auto"):
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
            return "fsdp"
        except ImportError:
            if cfg.parallel == "fsdp":
                raise ConfigError("train.parallel=fsdp needs torch >= 2.6 (FSDP2); use train.parallel=ddp") from None
    return "ddp"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum plain numbers over the processes of `group` (default: all; a no-op for one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest of a number over all processes (itself for one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def data_parallel_group(procs: Processes):
    """The processes holding the same part of the model and reading different data (None: all of them)."""
    if procs.tp == procs.pp == 1:
        return None
    return runtime.device_mesh(procs)["dp"].get_group()
