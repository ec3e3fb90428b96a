"""`llamakit finetune`: a base model + instruction or chat data -> a fine-tuned model or a PEFT adapter.

The same loop as pretraining; only the data (prompt tokens masked out of the loss), the starting
weights and which parameters train differ. Methods: full fine-tuning, LoRA, QLoRA (LoRA on a base whose
projections are NF4, Dettmers et al. 2023), prefix tuning, prompt tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from llamakit.checkpoint import find_tokenizer, load_model
from llamakit.data.sft import SFTDataConfig, load_sft
from llamakit.errors import ConfigError
from llamakit.model import Transformer
from llamakit.model.lora import LoRAConfig, apply_lora
from llamakit.model.nf4 import NF4, apply_nf4, nf4_transform, require_bitsandbytes
from llamakit.model.prefix import PrefixConfig, apply_prefix_tuning, apply_prompt_tuning
from llamakit.tokenizer import check_vocab, load_tokenizer
from llamakit.train.config import CheckpointSection, RunConfig
from llamakit.train.metrics import flops_per_token
from llamakit.train.objectives import NextTokenLoss
from llamakit.train.parallel import Processes
from llamakit.train.runner import Job, loop_data, run

log = logging.getLogger(__name__)
METHODS = ("full", "lora", "qlora", "prefix", "prompt")


@dataclass
class BaseModelSection:
    """The model to fine-tune (a checkpoint in any format) and how to hold its frozen weights."""

    path: str = "checkpoints/base"
    tokenizer: str | None = None  # None: the one beside the checkpoint
    dtype: str = "fp32"  # the frozen base of an adapter method may be bf16; full fine-tuning trains fp32 weights


@dataclass
class MethodSection:
    """What trains: everything (full), LoRA updates (on an NF4 base: qlora), prefix keys/values, or a soft prompt."""

    name: str = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # lora and qlora
    virtual_tokens: PrefixConfig = field(default_factory=PrefixConfig)  # prefix and prompt tuning


def check_method(method: MethodSection, allowed: tuple[str, ...], who_trains: str, why: str = "") -> None:
    """Refuse a method the command cannot train, naming the ones it can ("DPO trains full or lora")."""
    if method.name not in allowed:
        raise ConfigError(f"method.name={method.name!r}; {who_trains} {' or '.join(allowed)}{why}")


@dataclass
class FinetuneCheckpoints(CheckpointSection):
    out_dir: str = "runs/finetune"


@dataclass
class FinetuneConfig(RunConfig):
    command: ClassVar[str] = "finetune"
    checkpoint: FinetuneCheckpoints = field(default_factory=FinetuneCheckpoints)
    model: BaseModelSection = field(default_factory=BaseModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method.name not in METHODS:
            raise ConfigError(f"method.name={self.method.name!r}; choose one of {', '.join(METHODS)}")
        if self.method.name == "full" and self.model.dtype != "fp32":
            raise ConfigError(f"model.dtype={self.model.dtype}: full fine-tuning keeps fp32 master weights; use "
                              "train.precision bf16 for bf16 compute (or an adapter method for a bf16 base)")
        if self.method.name == "qlora":
            require_bitsandbytes()  # at once, not after the data is read


def finetune(cfg: FinetuneConfig, resume: bool = False) -> Path:
    """Fine-tune and return final/: a model folder (full) or a PEFT adapter folder (lora, qlora, prefix, prompt)."""
    return run(cfg, build_job, resume)


def build_job(cfg: FinetuneConfig, procs: Processes) -> Job:
    """The base model with the method applied, next-token loss on the answers, and the SFT examples."""
    tokenizer = base_tokenizer(cfg.model)
    train_set, val_set, report = load_sft(cfg.data, tokenizer)  # logs its report: examples, truncated, dropped
    # QLoRA quantizes the stored weights as they are read: the full-precision projections are never all in memory.
    quantize = [NF4()] if cfg.method.name == "qlora" else []
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=procs.device, transforms=quantize)
    # The prompt format it learns, saved with the result (config.json, or the adapter's metadata): chat prompts in it.
    model.config = model.config.replace(chat_format="alpaca" if report["format"] == "alpaca" else report["chat_format"])
    check_vocab(tokenizer, model.config.vocab_size, str(cfg.model.path))
    if cfg.data.seq_len > model.config.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the base model's max_seq_len="
                          f"{model.config.max_seq_len}; lower data.seq_len")
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices: the same on every process and every run
    adapter = apply_method(model, cfg.method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.config.num_params() + (0 if adapter is None else trainable)  # NF4 weights are buffers, not params
    log.info("method %s: %d trainable parameters, %.4f%% of %d", cfg.method.name, trainable, 100 * trainable / total,
             total)
    # Frozen weights need no weight gradients: the backward pass costs 2N instead of 4N FLOPs per token.
    flops = flops_per_token(model.config, cfg.data.seq_len) * (1 if adapter is None else 4 / 6)
    return Job(model.train(), NextTokenLoss(), loop_data(cfg, train_set, val_set, procs), tokenizer, flops,
               adapter=adapter, base=str(cfg.model.path))


def apply_method(model: Transformer, method: MethodSection) -> LoRAConfig | PrefixConfig | None:
    """Mark what trains; returns the adapter's settings (None for full fine-tuning)."""
    if method.name == "full":
        model.float().requires_grad_(True)
        return None
    if method.name == "qlora" and nf4_transform(model) is None:
        apply_nf4(model)  # the frozen base's projections in NF4 (build_job does it while loading instead)
    if method.name in ("lora", "qlora"):
        apply_lora(model, method.lora)
        return method.lora
    (apply_prefix_tuning if method.name == "prefix" else apply_prompt_tuning)(model, method.virtual_tokens)
    return method.virtual_tokens


def base_tokenizer(section: BaseModelSection):
    """model.tokenizer, else the tokenizer file beside the base checkpoint."""
    path = section.tokenizer or find_tokenizer(section.path)
    if path is None:
        raise ConfigError(f"{section.path}: no tokenizer.model beside the base model; set model.tokenizer")
    return load_tokenizer(path)
