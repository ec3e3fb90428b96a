"""Pretraining run folders as scaling-law data: each run's model size N and its (tokens seen D, loss) curve.

N conventions (--params): "non-embedding" (Kaplan et al. 2020) leaves out the token embedding and, when untied, the
output projection, which both have vocab_size x dim weights; "all" counts every weight (Hoffmann et al. 2022).
Non-embedding is the default because at the small sizes a sweep can afford the vocabulary matrices are most of the
model (dim 64, vocab 512: 66k of 165k weights) while adding almost nothing to what it can learn, so counting them
bends the law (Kaplan et al., Figure 6); at billions of parameters the gap is small (Llama 2 7B: 4%).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamakit.checkpoint import load_config
from llamakit.errors import DataError
from llamakit.model import ModelConfig
from llamakit.train.metrics import read_metrics
from llamakit.train.state import FINAL, step_dirs

PARAM_COUNTS = ("non-embedding", "all")
POINTS = ("final", "all")


def count_params(config: ModelConfig, convention: str = "non-embedding") -> int:
    """The model's N: every weight, or those outside the vocab_size x dim embedding and output matrices."""
    if convention not in PARAM_COUNTS:
        raise DataError(f"parameter count {convention!r}; choose one of {', '.join(PARAM_COUNTS)}")
    total = config.num_params()
    if convention == "all":
        return total
    return total - config.vocab_size * config.dim * (1 if config.tie_word_embeddings else 2)


@dataclass(frozen=True)
class RunCurve:
    """One pretraining run: its folder, size, and the metric at each evaluation after step 0."""

    path: Path
    config: ModelConfig
    n: int  # parameters, in the chosen convention
    steps: list[int]
    tokens: list[int]  # tokens seen at each evaluation
    loss: list[float]
    max_steps: int | None  # the length its schedule was set for (train_config.yaml)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and bool(self.steps) and self.steps[-1] >= self.max_steps


def read_run(path: str | Path, metric: str = "val_loss", params: str = "non-embedding") -> RunCurve:
    """A `llamakit pretrain` folder: the model config of its final/ (or latest step-N/) checkpoint and the metric's
    records in metrics.jsonl with the tokens seen so far."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run folder; give folders written by llamakit pretrain (checkpoint.out_dir)")
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise DataError(f"{path}: no metrics.jsonl records; is this a llamakit pretrain run folder "
                        "(checkpoint.out_dir), and has it trained a step?")
    config = load_config(_model_folder(path))
    points = [(r["step"], r["tokens_seen"], r[metric]) for r in records
              if metric in r and r.get("tokens_seen", 0) > 0]  # step 0: no tokens seen, no place on a log axis
    if not points:
        known = sorted({k for r in records for k in r} - {"step"})
        raise DataError(f"{path}: no {metric!r} after step 0 in metrics.jsonl (recorded: {', '.join(known)}); pick one "
                        "with --metric, or train with eval.every > 0")
    steps, tokens, loss = (list(x) for x in zip(*points))
    return RunCurve(path, config, count_params(config, params), steps, tokens, loss, _max_steps(path))


def _model_folder(path: Path) -> Path:
    """final/ when the run finished, else its latest step-N/ checkpoint: both hold the model's config.json."""
    for folder in (path / FINAL, *reversed(step_dirs(path))):
        if (folder / "config.json").is_file():
            return folder
    raise DataError(f"{path}: no final/ or step-N/ checkpoint with a config.json, so the model size is unknown; "
                    "set checkpoint.every > 0 or let the run finish")


def _max_steps(path: Path) -> int | None:
    import yaml

    config = path / "train_config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("max_steps")


def read_runs(paths, metric: str = "val_loss", params: str = "non-embedding") -> list[RunCurve]:
    """Run folders; a sweep's folder (llamakit scaling sweep: it holds grid.json) stands for its runs."""
    if not paths:
        raise DataError("no run folders given; pass the checkpoint.out_dir folders of llamakit pretrain runs, or a "
                        "llamakit scaling sweep folder")
    return [read_run(run, metric, params) for p in paths for run in _grid_runs(Path(p))]


def _grid_runs(path: Path) -> list[Path]:
    """A sweep folder's run folders in grid order (those trained so far), or [path] for a run folder."""
    grid = path / "grid.json"
    if not grid.is_file():
        return [path]
    import json

    runs = [path / r["name"] for r in json.loads(grid.read_text())["runs"]]
    started = [r for r in runs if (r / "metrics.jsonl").is_file()]
    if not started:
        raise DataError(f"{path}: none of the sweep's {len(runs)} runs has trained yet; run the sweep first")
    return started


@dataclass(frozen=True)
class Points:
    """(N, D, loss) arrays, and `run`: the index of the run each point comes from (bootstrap resamples runs)."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    run: np.ndarray

    def take(self, index: np.ndarray) -> Points:
        return Points(self.n[index], self.d[index], self.loss[index], self.run[index])

    def groups(self, by: str) -> list[np.ndarray]:
        """Point indices per run ("runs") or one per point ("points"): what a bootstrap resamples."""
        if by == "points":
            return [np.array([i]) for i in range(len(self.n))]
        return [np.flatnonzero(self.run == r) for r in np.unique(self.run)]


def scaling_points(runs: list[RunCurve], which: str = "final") -> Points:
    """Each run's last evaluation ("final": where its learning-rate schedule ended) or every evaluation ("all")."""
    if which not in POINTS:
        raise DataError(f"--points {which!r}; choose one of {', '.join(POINTS)}")
    rows = []
    for i, run in enumerate(runs):
        chosen = range(len(run.steps)) if which == "all" else [len(run.steps) - 1]
        rows += [(run.n, run.tokens[j], run.loss[j], i) for j in chosen]
    n, d, loss, run = (np.array(x) for x in zip(*rows))
    return Points(n.astype(float), d.astype(float), loss.astype(float), run)
