"""The training loop every method shares: pretraining, SFT, LoRA, DPO differ only in data, objective and
which parameters train.

Each optimizer step: this process's micro-batches -> forward/backward each (gradients accumulate; the
all-reduce happens once, on the last) -> clip -> AdamW step at the scheduled learning rate. The loss and the
objective's own metrics are normalised by the weight of the whole global batch, so results do not depend on how
many processes share it; tokens/s and MFU count the objective's tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from llamakit.model import resolve_dtype
from llamakit.train.metrics import MetricsLog, peak_memory_gb, reset_peak_memory
from llamakit.train.objectives import Batch, Objective
from llamakit.train.optim import set_lr
from llamakit.train.parallel import all_reduce_max, all_reduce_sum, gradient_sync
from llamakit.train.state import Checkpointer, TrainState


@dataclass
class LoopSettings:
    max_steps: int
    grad_clip: float  # 0: no clipping (the norm is still measured and logged)
    precision: str  # fp32, bf16, fp16
    eval_every: int  # 0: only at the end
    save_every: int  # 0: never (the caller saves the last step: see runner.run_training)
    log_every: int
    world_size: int = 1  # processes in the job
    data_parallel: int = 1  # model replicas, each reading its own micro-batches (world_size / (tp x pp))
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # of one device
    # Where sums over the global batch are taken: the data-parallel replicas (None: every process). Each tensor-
    # parallel rank computes the same loss, so summing over all of them would count it tp times.
    group: object = None


@dataclass
class LoopData:
    train_step: Callable[[int], list[Batch]]  # this process's micro-batches of optimizer step `step`
    val_batches: list[Batch]  # this process's share of the validation set (the same at every evaluation)
    # The data's own numbers about step `step`'s batches (PPO: the statistics of the rollout they come from).
    step_metrics: Callable[[int], dict[str, float]] | None = None


def train(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
          data: LoopData, settings: LoopSettings, state: TrainState, checkpointer: Checkpointer,
          metrics: MetricsLog, scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Run optimizer steps state.step .. max_steps - 1, evaluating, logging and checkpointing on the way."""
    device = next(model.parameters()).device
    autocast = _autocast(settings.precision, device)
    if state.step == 0 and settings.eval_every:  # the starting point of the validation curve
        metrics.record(0, evaluate(model, objective, data.val_batches, autocast, device, settings.group), show=True)
    model.train()
    reset_peak_memory(device)
    while state.step < settings.max_steps:
        start = time.perf_counter()
        lr = schedule(state.step)
        set_lr(optimizer, lr)
        means, tokens, grad_norm = _step(model, objective, optimizer, data.train_step(state.step), autocast,
                                         settings, scaler, device)
        state.step += 1
        state.tokens_seen += int(tokens)
        seconds = time.perf_counter() - start
        own = data.step_metrics(state.step - 1) if data.step_metrics is not None else {}
        values = {**own, **means, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
                  "tokens_seen": state.tokens_seen}
        if (memory := peak_memory_gb(device)) is not None:  # the largest of any process
            values["peak_memory_gb"] = all_reduce_max(memory, device)
        if settings.peak_flops:
            values["mfu"] = tokens * settings.flops_per_token / seconds / (settings.peak_flops * settings.world_size)
        last = state.step == settings.max_steps
        if (settings.eval_every and state.step % settings.eval_every == 0) or last:
            values.update(evaluate(model, objective, data.val_batches, autocast, device, settings.group))
        metrics.record(state.step, values, show=state.step % settings.log_every == 0 or last or "val_loss" in values)
        if settings.save_every and state.step % settings.save_every == 0 and not last:
            checkpointer.save(model, optimizer, scaler, state)
    return state


def _step(model, objective: Objective, optimizer, micro_batches: list[Batch], autocast, settings: LoopSettings,
          scaler, device) -> tuple[dict[str, float], float, float]:
    """One optimizer step; returns the global means (loss and the objective's metrics, each sum / global weight),
    the global token count and the grad norm."""
    weight, tokens = all_reduce_sum([sum(objective.weight(b) for b in micro_batches),
                                     sum(objective.tokens(b) for b in micro_batches)], device, settings.group)
    # DDP and FSDP average gradients over the data-parallel replicas; scale by their number so the sum over
    # all target tokens is divided exactly once, by the global weight.
    scale = settings.data_parallel / weight
    pipeline = getattr(model, "pipeline", None)  # pipeline parallel (pipeline.py): its schedule runs the micro-batches
    if pipeline is not None:
        sums = pipeline.forward_backward(micro_batches, scale, autocast, device)
    else:
        sums = _forward_backward(model, objective, micro_batches, scale, autocast, scaler, device)
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = settings.grad_clip or float("inf")
    grad_norm = (pipeline.clip_grad_norm(max_norm) if pipeline is not None
                 else nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _global_means(sums, weight, device, settings.group), tokens, float(grad_norm)


def _forward_backward(model, objective: Objective, micro_batches: list[Batch], scale: float, autocast, scaler, device
                      ) -> dict[str, torch.Tensor]:
    """Forward and backward each micro-batch (gradients accumulate; the all-reduce happens on the last); returns
    the summed loss and metrics."""
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(model, enabled=i == len(micro_batches) - 1), autocast:
            loss_sum, own = objective.loss(model, batch)
        scaled = loss_sum * scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        _accumulate(sums, {**own, "loss": loss_sum})
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: list[Batch], autocast, device, group=None
             ) -> dict[str, float]:
    """The objective's loss and metrics over the validation batches of every process: val_loss, val_<metric>."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    weight = 0.0
    pipeline = getattr(model, "pipeline", None)  # pipeline parallel: hidden states go stage to stage (pipeline.py)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss_sum, own = objective.loss(model, batch) if pipeline is None else (pipeline.eval_loss(batch), {})
        _accumulate(sums, {**own, "loss": loss_sum})
        weight += objective.weight(batch)
    model.train()
    (weight,) = all_reduce_sum([weight], device, group)
    return {f"val_{name}": value for name, value in _global_means(sums, max(weight, 1), device, group).items()}


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add a micro-batch's summed loss and metrics to the step's running sums (float64, detached)."""
    for name, value in values.items():
        if isinstance(value, DTensor):  # tensor parallel: the loss is replicated over the processes
            value = value.full_tensor()
        sums[name] = sums.get(name, 0) + value.detach().to(torch.float64)


def _global_means(sums: dict[str, torch.Tensor], weight: float, device, group=None) -> dict[str, float]:
    """Each sum over the data-parallel replicas, divided by the global weight (every process reports the same names)."""
    names = sorted(sums)
    totals = all_reduce_sum([float(sums[name]) for name in names], device, group)
    return {name: total / weight for name, total in zip(names, totals)}


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=resolve_dtype(precision))
