"""The LLaMA optimizer recipe: AdamW without decay on norms and biases, linear warmup, cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch import nn

from llamakit.train.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (projections, embeddings) decay; vectors (RMSNorm gains, biases) do not."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no state)."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    # foreach: one kernel per group of tensors, on CPU and GPU alike (fused measured no faster here).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: OptimSection, max_steps: int) -> float:
    """Learning rate of loop step `step` (0-based), i.e. of update u = step + 1 of updates 1..N (N = max_steps):
    linear warmup reaching the peak at update W = warmup_steps, then cosine from the peak to min_lr_ratio * peak
    at update N, each value used once. W = 0 is W = 1 (update 1 at the peak); W >= N only warms up."""
    u, warmup = step + 1, max(cfg.warmup_steps, 1)
    if u <= warmup:
        return cfg.lr * u / warmup
    progress = min((u - warmup) / (max_steps - warmup), 1.0)  # u > warmup implies max_steps > warmup
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
