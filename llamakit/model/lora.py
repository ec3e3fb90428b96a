"""LoRA (Hu et al., 2021): a frozen weight W plus a trainable low-rank update (alpha / r) * B @ A.

Applied from outside by swapping the targeted nn.Linear modules for LoRALinear wrappers; the model class
is untouched. Names follow PEFT (`base_layer`, `lora_A`, `lora_B`), so adapters map 1:1 onto its files.
QLoRA (Dettmers et al., 2023) is LoRA on an NF4-quantized base (model/nf4.py): the wrapper adds its update to the
NF4Linear's output the same way, and merging dequantizes the base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from llamakit.errors import ConfigError
from llamakit.model.nf4 import NF4Linear, dequantize_nf4

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Which projections get an update, of what rank, and its scale alpha / rank."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # any of LINEAR_NAMES, or "all-linear"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(LINEAR_NAMES) if tuple(self.targets) == ("all-linear",) else tuple(self.targets)
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if unknown or not self.targets:
            raise ConfigError(f"lora targets {list(unknown or self.targets)} match no projection of a Llama model; "
                              f"choose from {', '.join(LINEAR_NAMES)} (or all-linear)")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))); B starts at zero, so the wrapped model starts unchanged."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # The update trains in fp32 even when the frozen base is bf16.
        device = base.qweight.device if isinstance(base, NF4Linear) else base.weight.device
        kwargs = {"device": device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kwargs)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kwargs)
        self.disabled = False  # True inside disable_lora: the base layer alone
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear initialises it (Kaiming-uniform), B zero: the update starts at exactly 0."""
        self.lora_A.reset_parameters()
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix (out, in): scaling * B @ A."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze model and wrap each targeted projection in a LoRALinear; returns the wrapped module names."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, NF4Linear)) and name.rsplit(".", 1)[-1] in cfg.targets]
    if not targets:
        raise ConfigError(f"lora targets {list(cfg.targets)} match no nn.Linear in this model; is LoRA already "
                          "merged into it, or is it not a Llama model?")
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        wrapper = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout).train(module.training)  # dropout off in eval
        setattr(model.get_submodule(parent), child, wrapper)
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA wrappers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every LoRA wrapper computes only its base layer: a LoRA policy serves as its own frozen reference."""
    before = {module: module.disabled for module in lora_modules(model).values()}
    for module in before:
        module.disabled = True
    try:
        yield model
    finally:
        for module, disabled in before.items():  # nested uses restore what the outer one set
            module.disabled = disabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W += scaling * B @ A) and unwrap it: a plain model again.

    NF4 bases are dequantized first (QLoRA), so the merged model computes what the QLoRA model computed."""
    dequantize_nf4(model)
    for name, module in lora_modules(model).items():
        base = module.base_layer
        base.weight += module.delta_weight().to(base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    return model
