"""`llamakit pretrain`: prepared shards + a config -> step-N/ checkpoints -> final/, a normal model folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llamakit.checkpoint import load_model
from llamakit.data import TokenShards
from llamakit.data.shards import check_tokenizer_copy
from llamakit.errors import ConfigError
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer, check_vocab, load_tokenizer
from llamakit.tokenizer.base import MAX_VOCAB_PADDING
from llamakit.train.batches import PackedWindows
from llamakit.train.config import ModelSection, PretrainConfig, model_config
from llamakit.train.loop import LoopData
from llamakit.train.metrics import flops_per_token
from llamakit.train.objectives import NextTokenLoss
from llamakit.train.parallel import Processes
from llamakit.train.runner import Job, loop_data, run

log = logging.getLogger(__name__)


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Train from scratch (or from model.init_from) and return the final/ folder."""
    return run(cfg, build_job, resume)


def build_job(cfg: PretrainConfig, procs: Processes) -> Job:
    """The model, next-token loss and packed windows of the prepared shards."""
    shards = TokenShards(cfg.data.path, "train")
    check_tokenizer_copy(shards.root, shards.meta)  # a missing or replaced copy is named before it is loaded
    tokenizer = load_tokenizer(shards.tokenizer_path)
    shards.check_tokenizer(tokenizer)
    _check_vocab_size(cfg.model, tokenizer)
    model = _build_model(cfg, shards.vocab_size, procs)
    check_vocab(tokenizer, model.config.vocab_size, cfg.model.init_from or "model.vocab_size")
    return Job(model, NextTokenLoss(), _data(cfg, shards, procs), tokenizer,
               flops_per_token(model.config, cfg.data.seq_len))


def _check_vocab_size(section: ModelSection, tokenizer: Tokenizer) -> None:
    """An explicit model.vocab_size must hold every id of the data's tokenizer (padding it by a little at most)."""
    size, n = section.vocab_size, tokenizer.vocab_size
    if size is None or section.init_from or n <= size <= n + MAX_VOCAB_PADDING:
        return
    relation = "smaller than" if size < n else f"more than {MAX_VOCAB_PADDING} above"
    raise ConfigError(f"model.vocab_size={size} is {relation} the {n} tokens of the data's tokenizer "
                      f"({tokenizer.path}); remove model.vocab_size to use the tokenizer's size, or set it between "
                      f"{n} and {n + MAX_VOCAB_PADDING}")


def _build_model(cfg: PretrainConfig, data_vocab: int, procs: Processes) -> Transformer:
    """The model on this process's device: initialised from train.seed (the same on every process), or loaded."""
    if cfg.model.init_from:
        return load_model(cfg.model.init_from, dtype=torch.float32, device=procs.device).requires_grad_(True)
    config = model_config(cfg.model, data_vocab, cfg.data.seq_len)
    if config.max_seq_len < cfg.data.seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={config.max_seq_len}")
    torch.manual_seed(cfg.train.seed)
    model = Transformer(config)  # on CPU: the same initial weights whatever the device or process count
    model.init_weights(cfg.model.init_std)
    return model.to(procs.device)


def _data(cfg: PretrainConfig, shards: TokenShards, procs: Processes) -> LoopData:
    val = PackedWindows(TokenShards(cfg.data.path, "val"), cfg.data.seq_len, split="val")
    return loop_data(cfg, PackedWindows(shards, cfg.data.seq_len), val, procs)
