"""Typed training configuration: YAML presets in configs/ mirror these dataclasses; `--section.key value` overrides."""

from __future__ import annotations

import dataclasses
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from llamakit.errors import ConfigError
from llamakit.model import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
PARALLEL = ("auto", "fsdp", "ddp")


@dataclass
class ModelSection:
    """The architecture: a named preset and/or explicit fields (these override the preset's)."""

    preset: str | None = None
    init_from: str | None = None  # a checkpoint to continue training from (its architecture and weights)
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None  # None: the data's tokenizer's vocabulary
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None  # None: data.seq_len
    tie_word_embeddings: bool | None = None
    init_std: float = 0.02


@dataclass
class DataSection:
    """Prepared token shards (`llamakit prepare`) and the training window."""

    path: str = "data/prepared"
    seq_len: int = 256


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (LLaMA: betas 0.9/0.95, wd 0.1, 2000 warmup steps, cosine to 10%)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainSection:
    """Steps, batch sizes, precision and the speed-ups applied from outside the model."""

    max_steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all processes (independent of their number)
    micro_batch_size: int = 8  # sequences per forward/backward on one process
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast with fp32 master weights
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: str = "auto"  # with several processes: fsdp (FSDP2 fully_shard) or ddp; auto picks fsdp
    # Model parallelism (torchrun processes = data-parallel replicas x tensor_parallel x pipeline_parallel):
    tensor_parallel: int = 1  # processes splitting every layer (DTensor; sequence-parallel norms, vocab-parallel loss)
    pipeline_parallel: int = 1  # stages splitting the layers; each step's micro-batches flow through them
    pipeline_schedule: str = "1f1b"  # 1f1b or gpipe


@dataclass
class EvalSection:
    """Validation loss on the prepared validation split."""

    every: int = 100  # steps; 0 only at the end
    batches: int = 10  # micro-batches per evaluation


@dataclass
class CheckpointSection:
    """Where runs write: step-N/ checkpoints (kept last K), final/, metrics, the loss curve."""

    out_dir: str = "runs/pretrain"
    every: int = 500
    keep_last: int = 2


@dataclass
class LogSection:
    every: int = 10  # steps between progress-bar/log updates (metrics.jsonl gets every step)
    tensorboard: bool = True
    plot: bool = True
    peak_tflops: float | None = None  # for MFU; None: the GPU's published peak, or a measured matmul peak on CPU


@dataclass
class RunConfig:
    """The sections every training command shares; a method's config adds its own (model, data, method, ...).

    Every method's data section has a `seq_len`: the training window."""

    command: ClassVar[str] = "train"
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        check(self)


@dataclass
class PretrainConfig(RunConfig):
    command: ClassVar[str] = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)


def check(cfg) -> None:
    """Values a user can get wrong, named with their section, e.g. train.batch_size (any run config)."""
    t, o = cfg.train, cfg.optim
    positive = {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
                "train.micro_batch_size": t.micro_batch_size, "data.seq_len": cfg.data.seq_len,
                "optim.lr": o.lr, "checkpoint.keep_last": cfg.checkpoint.keep_last, "log.every": cfg.log.every}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in {"optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                        "optim.weight_decay": o.weight_decay, "eval.every": cfg.eval.every,
                        "eval.batches": cfg.eval.batches, "checkpoint.every": cfg.checkpoint.every}.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be in [0, 1), got {o.betas}")
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size="
                          f"{t.micro_batch_size} (the rest is gradient accumulation)")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if t.parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={t.parallel!r}; choose one of {', '.join(PARALLEL)}")
    for name, value in {"train.tensor_parallel": t.tensor_parallel, "train.pipeline_parallel": t.pipeline_parallel}.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    if t.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(f"train.pipeline_schedule={t.pipeline_schedule!r}; choose one of {', '.join(PIPELINE_SCHEDULES)}")


def accumulation_steps(cfg: TrainSection, world_size: int) -> int:
    """Micro-batches per optimizer step on each process, so that the global batch does not depend on N."""
    per_process, rest = divmod(cfg.batch_size, world_size * cfg.micro_batch_size)
    if rest or not per_process:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x processes ({world_size}); change one of them")
    return per_process


def model_config(section: ModelSection, vocab_size: int, seq_len: int) -> ModelConfig:
    """The architecture: the preset (if any) with the explicit fields on top; vocab and context from the data."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    overrides = {k: v for k, v in dataclasses.asdict(section).items() if k in fields and v is not None}
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("max_seq_len", max(seq_len, 1))
    if section.preset:
        return ModelConfig.from_preset(section.preset).replace(**overrides)
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in overrides]
    if missing:
        raise ConfigError(f"model: give a preset or the fields {', '.join('model.' + k for k in missing)}")
    return ModelConfig(**overrides)


def parse_config(path: str | Path, overrides: list[str] = (), kind: type[RunConfig] = PretrainConfig):
    """Read a YAML preset of a `kind` config and apply `--section.key value` overrides; unknown keys and bad
    values are errors."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file (presets are in configs/)")
    parser = config_parser(kind)
    try:
        namespace = parser.parse_args(["--config", str(path), *overrides])
    except ArgumentError as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
    if namespace.resume:
        raise ConfigError(f"--resume is not a config value; call {kind.command}(cfg, resume=True)")
    try:
        sections = parser.instantiate(namespace)
    except (ValueError, TypeError) as e:  # a section's own validation, e.g. LoRAConfig's
        raise ConfigError(f"{path}: {e}") from None
    return kind(**{f.name: sections[f.name] for f in dataclasses.fields(kind)})


def run_sections(kind: type[RunConfig]) -> list[dataclasses.Field]:
    """A run config's sections in reading order: the method's own (model, data, ...), then the shared ones."""
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(kind)
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def config_parser(kind: type[RunConfig] = PretrainConfig):
    """The jsonargparse parser for a run config's sections (its --help lists every key)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    command = kind.command
    parser = ArgumentParser(exit_on_error=False, prog=f"llamakit {command} CONFIG.yaml", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help=f"a YAML preset, e.g. configs/{command}/tiny.yaml")
    # The command's own flag (cli/train.py), so that `llamakit pretrain CONFIG.yaml --help` lists it too.
    parser.add_argument("--resume", action="store_true", help="continue the run in checkpoint.out_dir")
    for section in run_sections(kind):
        parser.add_class_arguments(section.default_factory, section.name, fail_untyped=True)
    return parser


def dump_yaml(cfg) -> str:
    """The resolved config as YAML, loadable again with parse_config."""
    import yaml

    sections = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in run_sections(type(cfg))}
    return yaml.safe_dump(json_ready(sections), sort_keys=False)


def json_ready(value):
    """Tuples as lists, so YAML/JSON dumps stay plain."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
