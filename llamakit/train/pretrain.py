"""`llamakit pretrain`: prepared shards + a config -> step-N/ checkpoints -> final/, a normal model folder."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import yaml

from llamakit.checkpoint import load_model
from llamakit.data import TokenShards
from llamakit.errors import ConfigError
from llamakit.model import Transformer, resolve_dtype
from llamakit.tokenizer import check_vocab, load_tokenizer
from llamakit.train.batches import PackedWindows, StepBatches, eval_batches
from llamakit.train.config import PretrainConfig, accumulation_steps, dump_yaml, model_config
from llamakit.train.loop import LoopData, LoopSettings, train
from llamakit.train.metrics import MetricsLog, flops_per_token, peak_flops, plot_losses
from llamakit.train.objectives import NextTokenLoss
from llamakit.train.optim import build_optimizer, lr_at
from llamakit.train.parallel import Processes, close_processes, init_processes, keep_freed_memory, parallelize
from llamakit.train.state import Checkpointer, TrainState

log = logging.getLogger(__name__)
# Settings that may change when resuming: everything else must match, or the run would not be the same run.
RESUMABLE_CHANGES = ("train.max_steps", "checkpoint", "log", "eval", "train.device", "train.compile",
                     "train.activation_checkpointing", "train.parallel", "train.micro_batch_size")


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Train from scratch (or from model.init_from) and return the final/ folder."""
    procs = init_processes(cfg.train.device)
    if procs.device.type == "cpu":
        keep_freed_memory()
    try:
        return _run(cfg, resume, procs)
    finally:
        close_processes()


def _run(cfg: PretrainConfig, resume: bool, procs: Processes) -> Path:
    shards = TokenShards(cfg.data.path, "train")
    tokenizer = load_tokenizer(shards.tokenizer_path)
    shards.check_tokenizer(tokenizer)
    out_dir = Path(cfg.checkpoint.out_dir)
    checkpointer = Checkpointer(out_dir, cfg.checkpoint.keep_last, procs, tokenizer, dump_yaml(cfg))
    latest = _check_run_folder(cfg, out_dir, checkpointer.latest(), resume)

    model = _build_model(cfg, shards.vocab_size, procs)
    check_vocab(tokenizer, model.config.vocab_size, "model.vocab_size")
    flops = flops_per_token(model.config, cfg.data.seq_len)
    model = parallelize(model, cfg.train, procs)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(procs.device.type) if cfg.train.precision == "fp16" else None
    state = checkpointer.load(latest, model, optimizer, scaler) if latest else TrainState()
    if latest:
        log.info("resuming from %s (step %d)", latest, state.step)
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.yaml").write_text(dump_yaml(cfg))

    data = _loop_data(cfg, shards, procs)
    settings = LoopSettings(
        max_steps=cfg.train.max_steps, grad_clip=cfg.optim.grad_clip, precision=cfg.train.precision,
        eval_every=cfg.eval.every, save_every=cfg.checkpoint.every, log_every=cfg.log.every,
        world_size=procs.world_size, flops_per_token=flops,
        peak_flops=peak_flops(procs.device, resolve_dtype(cfg.train.precision), cfg.log.peak_tflops))
    metrics = MetricsLog(out_dir, procs.is_main, state.step, cfg.train.max_steps, cfg.log.tensorboard)
    try:
        schedule = functools.partial(lr_at, cfg=cfg.optim, max_steps=cfg.train.max_steps)
        train(model, NextTokenLoss(), optimizer, schedule, data, settings, state, checkpointer, metrics, scaler)
    finally:
        metrics.close()
    final = checkpointer.save_final(model)
    if procs.is_main and cfg.log.plot:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return final


def _check_run_folder(cfg: PretrainConfig, out_dir: Path, latest: Path | None, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses to mix two different runs in one folder."""
    if latest is None:
        if resume:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", out_dir)
        return None
    if not resume:
        raise ConfigError(f"{out_dir} already holds checkpoints (latest: {latest.name}); pass --resume to continue "
                          "that run, or set checkpoint.out_dir to a new folder")
    saved = _flatten(yaml.safe_load((latest / "train_config.yaml").read_text()))
    now = _flatten(yaml.safe_load(dump_yaml(cfg)))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {out_dir}; resuming exactly needs "
                          "the same values (start a new run in another checkpoint.out_dir to change them)")
    return latest


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def _loop_data(cfg: PretrainConfig, shards: TokenShards, procs: Processes) -> LoopData:
    micro = cfg.train.micro_batch_size
    accumulation_steps(cfg.train, procs.world_size)  # fails early if the global batch does not split evenly
    windows = PackedWindows(shards, cfg.data.seq_len)
    steps = StepBatches(windows, cfg.train.batch_size, micro, procs.rank, procs.world_size, cfg.train.seed)
    val = PackedWindows(TokenShards(cfg.data.path, "val"), cfg.data.seq_len, split="val")
    return LoopData(steps.train_step, eval_batches(val, cfg.eval.batches, micro, procs.rank, procs.world_size))
