"""What every training method shares around the loop: the run folder, parallelism, optimizer, resume, metrics."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from llamakit.errors import ConfigError
from llamakit.model import resolve_dtype
from llamakit.tokenizer import Tokenizer
from llamakit.train.batches import Samples, StepBatches, eval_batches
from llamakit.train.config import RunConfig, TrainSection, accumulation_steps, dump_yaml
from llamakit.train.loop import LoopData, LoopSettings, train
from llamakit.train.metrics import MetricsLog, peak_flops, plot_losses
from llamakit.train.objectives import NextTokenLoss, Objective
from llamakit.train.optim import build_optimizer, lr_at
from llamakit.train.parallel import (
    Processes,
    close_processes,
    data_parallel_group,
    init_processes,
    keep_freed_memory,
    parallelize,
)
from llamakit.train.pipeline import check_pipeline
from llamakit.train.run_folder import own_run_folder
from llamakit.train.state import FINAL, Checkpointer, TrainState, step_dirs, step_of

log = logging.getLogger(__name__)
# Settings that may change when resuming: everything else must match, or the run would not be the same run.
RESUMABLE_CHANGES = ("train.max_steps", "checkpoint", "log", "eval", "train.device", "train.compile",
                     "train.activation_checkpointing", "train.parallel", "train.micro_batch_size",
                     "train.pipeline_parallel", "train.pipeline_schedule", "train.tensor_parallel")


@dataclass
class Job:
    """What a method brings to the loop: the model (its trainable parameters marked), objective and data, and
    any frozen models the objective reads (a reference, a reward or a value model)."""

    model: nn.Module
    objective: Objective
    data: LoopData
    tokenizer: Tokenizer
    flops_per_token: float
    adapter: object | None = None  # LoRAConfig/PrefixConfig: checkpoints hold only the adapter
    base: str | None = None  # the base model an adapter belongs to
    # Placed on the device and sharded in place like the policy (so the objective may hold the same modules),
    # in eval mode with no gradients; never trained, never checkpointed.
    aux: dict[str, nn.Module] = field(default_factory=dict)


def run(cfg: RunConfig, build_job: Callable[[RunConfig, Processes], Job], resume: bool = False) -> Path:
    """Every training command: own the run folder, build the method's job on this process, train it; returns the
    final/ folder."""
    with processes(cfg.train, cfg.checkpoint.out_dir) as procs:
        latest = check_run_folder(cfg, Path(cfg.checkpoint.out_dir), resume)
        if latest is not None and latest.name == FINAL:  # a finished run: nothing to load or train
            return latest
        return run_training(cfg, build_job(cfg, procs), procs, latest)


@contextlib.contextmanager
def processes(train: TrainSection, out_dir: str | Path):
    """This process's place in the job and its layout (data, tensor and pipeline parallel), for the duration of a
    run (torch.distributed set up and torn down), with the run folder out_dir owned by this run."""
    procs = init_processes(train.device).with_layout(train.tensor_parallel, train.pipeline_parallel,
                                                     ("train.tensor_parallel", "train.pipeline_parallel"))
    if procs.device.type == "cpu":
        keep_freed_memory()
    try:
        with own_run_folder(Path(out_dir), procs):
            yield procs
    finally:
        close_processes()


def run_training(cfg: RunConfig, job: Job, procs: Processes, latest: Path | None) -> Path:
    """Train job with the run config's optimizer, schedule and checkpoints, from the step-N/ folder `latest` if
    given; returns the final/ folder."""
    out_dir = Path(cfg.checkpoint.out_dir)
    checkpointer = Checkpointer(out_dir, cfg.checkpoint.keep_last, procs, job.tokenizer, dump_yaml(cfg),
                                adapter=job.adapter, base=job.base)
    check_pipeline(cfg.train, procs, job.objective, job.adapter)  # before anything is split (pipeline.py)
    if procs.tp > 1 and (type(job.objective) is not NextTokenLoss or job.adapter is not None or job.aux):
        raise ConfigError("train.tensor_parallel trains a whole model on the next-token loss (pretrain, finetune "
                          "with method full); set it to 1 for adapters and the other methods")
    if procs.tp > 1 and procs.dp > 1 and cfg.train.parallel == "ddp":
        raise ConfigError("train.tensor_parallel with data-parallel replicas shards them with FSDP; set train.parallel "
                          "to fsdp or auto")
    model = parallelize(job.model, cfg.train, procs)
    for name, frozen in job.aux.items():
        job.aux[name] = parallelize(frozen.to(procs.device).eval().requires_grad_(False), cfg.train, procs)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(procs.device.type) if cfg.train.precision == "fp16" else None
    state = checkpointer.load(latest, model, optimizer, scaler) if latest else TrainState()
    if latest:
        log.info("resuming from %s (step %d)", latest, state.step)
    if procs.is_main:
        (out_dir / "train_config.yaml").write_text(dump_yaml(cfg))
    settings = LoopSettings(
        max_steps=cfg.train.max_steps, grad_clip=cfg.optim.grad_clip, precision=cfg.train.precision,
        eval_every=cfg.eval.every, save_every=cfg.checkpoint.every, log_every=cfg.log.every,
        world_size=procs.world_size, data_parallel=procs.dp, group=data_parallel_group(procs),
        flops_per_token=job.flops_per_token,
        peak_flops=peak_flops(procs.device, resolve_dtype(cfg.train.precision), cfg.log.peak_tflops))
    metrics = MetricsLog(out_dir, procs.is_main, state.step, cfg.train.max_steps, cfg.log.tensorboard, cfg.command)
    start = state.step
    try:
        schedule = functools.partial(lr_at, cfg=cfg.optim, max_steps=cfg.train.max_steps)
        with _vocab_parallel_loss(procs.tp > 1):  # tensor parallel: the logits stay split on the vocabulary
            train(model, job.objective, optimizer, schedule, job.data, settings, state, checkpointer, metrics, scaler)
    finally:
        metrics.close()
    if state.step > start:  # the last step gets a full checkpoint too: the run can be continued exactly
        checkpointer.save(model, optimizer, scaler, state)
    final = checkpointer.save_final(model)
    if procs.is_main and cfg.log.plot:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return final


def _vocab_parallel_loss(enabled: bool):
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel() if enabled else contextlib.nullcontext()


def loop_data(cfg: RunConfig, train_set: Samples, val_set: Samples, procs: Processes) -> LoopData:
    """This process's micro-batches of each step, and its share of the validation set: the processes of one model
    replica (its tensor-parallel ranks and pipeline stages) read the same ones."""
    micro = cfg.train.micro_batch_size
    accumulation_steps(cfg.train, procs.dp)  # fails early if the global batch does not split evenly
    steps = StepBatches(train_set, cfg.train.batch_size, micro, procs.dp_rank, procs.dp, cfg.train.seed)
    return LoopData(steps.train_step, eval_batches(val_set, cfg.eval.batches, micro, procs.dp_rank, procs.dp))


def check_run_folder(cfg: RunConfig, out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh), or final/ when the run is already finished; refuses
    to mix two different runs in one folder."""
    steps, final = step_dirs(out_dir), out_dir / FINAL
    latest = steps[-1] if steps else None
    found = latest or (final if final.is_dir() else None)
    if found is None:
        if resume:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", out_dir)
        return None
    if not resume:
        raise ConfigError(f"{out_dir} already holds a run (latest: {found.name}/); pass --resume to continue that "
                          "run, or set checkpoint.out_dir to a new folder")
    saved = _flatten(yaml.safe_load((found / "train_config.yaml").read_text()))
    now = _flatten(yaml.safe_load(dump_yaml(cfg)))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        verb = "differs" if len(changed) == 1 else "differ"
        raise ConfigError(f"--resume: {', '.join(changed)} {verb} from the run in {out_dir}; resuming exactly needs "
                          "the same values (start a new run in another checkpoint.out_dir to change them)")
    done, max_steps = step_of(latest) if latest else saved["train.max_steps"], cfg.train.max_steps
    if done > max_steps:
        raise ConfigError(f"--resume: the run in {out_dir} is at step {done}, beyond train.max_steps={max_steps}; "
                          "raise train.max_steps")
    if done == max_steps and final.is_dir():
        log.info("%s: the run is finished (%d steps); nothing to train (raise train.max_steps to continue it)",
                 out_dir, done)
        return final
    if latest is None:
        raise ConfigError(f"--resume: {out_dir} holds only final/ ({done} steps) and no step-N/ checkpoint to "
                          f"continue from; train a new run from {final} in another checkpoint.out_dir")
    return latest


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
