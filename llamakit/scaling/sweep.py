"""A grid of small pretraining runs for a scaling-law fit: model sizes x token (or compute) budgets, each run a
`llamakit pretrain` subprocess in its own folder, recorded in grid.json.

Every run gets its own max_steps, so its cosine schedule ends at its budget: Hoffmann et al. (2022) found that a
run's loss part-way through a longer schedule overstates what a run of that length reaches. With --flops, the
budgets are compute C and each size trains on D = C / (6N) tokens: Hoffmann et al.'s IsoFLOP design (approach 2).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llamakit.errors import ConfigError, DataError
from llamakit.files import write_atomic
from llamakit.scaling.runs import count_params
from llamakit.train.config import PretrainConfig, model_config, parse_config
from llamakit.train.metrics import read_metrics
from llamakit.train.state import FINAL

log = logging.getLogger(__name__)
GRID = "grid.json"
SIZE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?(?:x(\d+))?$")  # DIMxLAYERS[xHEADS[xKV_HEADS]]


@dataclass(frozen=True)
class Size:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def label(self) -> str:
        return f"{self.dim}x{self.n_layers}"

    def overrides(self) -> list[str]:
        return ["--model.dim", str(self.dim), "--model.n_layers", str(self.n_layers), "--model.n_heads",
                str(self.n_heads), "--model.n_kv_heads", str(self.n_kv_heads)]


def parse_size(text: str, base: PretrainConfig) -> Size:
    """DIMxLAYERS[xHEADS[xKV_HEADS]]; heads default to the base config's head size, KV heads to its grouping."""
    match = SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"--sizes: {text!r} is not DIMxLAYERS[xHEADS[xKV_HEADS]], e.g. 64x2 or 128x4x4x2")
    dim, n_layers, heads, kv = (int(g) if g else None for g in match.groups())
    model = base.model
    if heads is None:
        if not (model.dim and model.n_heads) or dim % (model.dim // model.n_heads):
            raise ConfigError(f"--sizes {text}: give the heads (DIMxLAYERSxHEADS); the base config's head size does "
                              f"not divide dim {dim}")
        heads = dim // (model.dim // model.n_heads)
    if kv is None:
        group = model.n_heads // (model.n_kv_heads or model.n_heads) if model.n_heads else 1
        kv = heads // group if heads % group == 0 else heads
    return Size(dim, n_layers, heads, kv)


@dataclass
class SweepRun:
    """One run of the grid: its folder name, size, schedule length and what it was sized for."""

    name: str
    size: Size
    n: int  # parameters in the grid's convention
    steps: int
    tokens: int  # steps x batch_size x seq_len
    flops: float  # 6 N D
    overrides: list[str]
    params: str = "non-embedding"  # N's convention (llamakit.scaling.runs.count_params)
    status: str = "pending"  # pending, finished, failed
    seconds: float | None = None


def plan_sweep(base: str | Path, sizes: list[str], tokens: list[float] = (), flops: list[float] = (),
               evals: int = 8, params: str = "non-embedding", overrides: list[str] = ()) -> list[SweepRun]:
    """The grid's runs: each size with each token budget (or each compute budget, D = C / 6N); every run
    evaluates about `evals` times. Each run's config is parsed, so a bad override fails before anything trains."""
    if bool(tokens) == bool(flops):
        raise ConfigError("give the budgets as --tokens or as --flops (one of them)")
    if not sizes or evals < 1:
        raise ConfigError("give at least one --sizes entry, and --evals >= 1")
    cfg = parse_config(base, list(overrides))
    per_step = cfg.train.batch_size * cfg.data.seq_len
    runs, names = [], set()
    for size in (parse_size(s, cfg) for s in sizes):
        n = _params(cfg, size, params)
        for budget in tokens or flops:
            steps = max(1, round((budget if tokens else budget / (6 * n)) / per_step))
            name = f"{size.label}-s{steps}"
            if name in names:
                log.warning("%s: two budgets round to %d steps; training it once", name, steps)
                continue
            names.add(name)
            run_overrides = [*overrides, *size.overrides(), "--train.max_steps", str(steps),
                             "--eval.every", str(max(1, steps // evals))]
            parse_config(base, run_overrides)  # the run's own config is valid
            runs.append(SweepRun(name, size, n, steps, steps * per_step, 6.0 * n * steps * per_step, run_overrides,
                                 params))
    return runs


def _params(cfg: PretrainConfig, size: Size, convention: str) -> int:
    """N of one size. The data's vocabulary matters only to the "all" count (non-embedding N does not depend on
    it), so a grid can be planned before the data is prepared."""
    vocab = cfg.model.vocab_size or _data_vocab(cfg.data.path)
    if vocab is None and convention == "all":
        raise DataError(f"{cfg.data.path}: no prepared data to read the vocabulary size from; prepare it first, or "
                        "set model.vocab_size")
    section = replace(cfg.model, dim=size.dim, n_layers=size.n_layers, n_heads=size.n_heads,
                      n_kv_heads=size.n_kv_heads)
    return count_params(model_config(section, vocab or 1, cfg.data.seq_len), convention)


def _data_vocab(path: str) -> int | None:
    from llamakit.data import TokenShards

    try:
        return TokenShards(path, "train").vocab_size
    except DataError:
        return None


def finished(folder: Path, steps: int) -> bool:
    """The run trained all its steps: final/ is there and metrics.jsonl reached the last step."""
    records = read_metrics(folder / "metrics.jsonl")
    return (folder / FINAL / "config.json").is_file() and bool(records) and records[-1]["step"] >= steps


def run_sweep(base: str | Path, runs: list[SweepRun], out: str | Path, jobs: int = 1,
              on_done: Callable[[SweepRun], None] | None = None) -> list[SweepRun]:
    """Train the runs not yet finished (`jobs` at a time), resuming those a crash or Ctrl-C interrupted; grid.json
    in `out` records the grid and each run's status."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for run in runs:
        if finished(out / run.name, run.steps):
            run.status = "finished"
        else:
            todo.append(run)
    _record(base, runs, out)
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # runs side by side must not each claim every core
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_train, base, run, out, env) for run in todo]
        for future in concurrent.futures.as_completed(futures):
            run = future.result()
            _record(base, runs, out)
            if on_done is not None:
                on_done(run)
    return runs


def command(base: str | Path, run: SweepRun, out: Path) -> list[str]:
    """`python -m llamakit pretrain BASE ... --resume`: a finished run does nothing, an interrupted one resumes."""
    return [sys.executable, "-m", "llamakit", "pretrain", str(base), *run.overrides,
            "--checkpoint.out_dir", str(out / run.name), "--resume"]


def _train(base: str | Path, run: SweepRun, out: Path, env: dict) -> SweepRun:
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    start = time.perf_counter()
    log.info("training %s (%d steps, %d tokens)", run.name, run.steps, run.tokens)
    with open(logs / f"{run.name}.log", "w") as f:
        done = subprocess.run(command(base, run, out), env=env, stdout=f, stderr=subprocess.STDOUT)
    run.seconds = round(time.perf_counter() - start, 1)
    run.status = "finished" if done.returncode == 0 else "failed"
    return run


def _record(base: str | Path, runs: list[SweepRun], out: Path) -> None:
    grid = {"base_config": str(base), "runs": [asdict(r) | {"command": command(base, r, out)} for r in runs]}
    write_atomic(out / GRID, (json.dumps(grid, indent=1) + "\n").encode())
