"""Real pretraining run folders as scaling data, the sweep's grid, and `llamakit scaling fit|sweep` end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamakit.checkpoint import load_config
from llamakit.cli import main
from llamakit.errors import ConfigError
from llamakit.model import Transformer
from llamakit.scaling import count_params, read_run, read_runs, scaling_points
from llamakit.scaling.sweep import finished, parse_size, plan_sweep, run_sweep
from llamakit.train import parse_config
from tests.train.test_pretrain import ENV, prepared  # noqa: F401 (prepared: the module's tokenized corpus)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "scaling" / "tiny-sweep.yaml"
SIZES = ["32x1", "32x2", "64x2"]
TOKENS = [640, 1280]  # 5 and 10 steps of 4 x 32 tokens


def tiny(data: Path) -> list[str]:
    """Overrides that make every run of the grid a few seconds' work."""
    return ["--data.path", str(data), "--data.seq_len", "32", "--train.batch_size", "4", "--train.micro_batch_size",
            "4", "--eval.batches", "1", "--optim.warmup_steps", "2", "--checkpoint.every", "0"]


@pytest.fixture(scope="module")
def sweep(prepared, tmp_path_factory, one_thread) -> Path:  # noqa: F811
    """A 3-size x 2-budget grid trained in-process with the sweep's own per-run overrides, then recorded by
    run_sweep (which finds every run finished and starts no process)."""
    out = tmp_path_factory.mktemp("sweep")
    runs = plan_sweep(BASE, SIZES, tokens=TOKENS, overrides=tiny(prepared))
    for run in runs:
        assert main(["pretrain", str(BASE), *run.overrides, "--checkpoint.out_dir", str(out / run.name)]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("run_sweep started a process for a finished run")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", no_training)
        assert [r.status for r in run_sweep(BASE, runs, out)] == ["finished"] * 6
    return out


def test_a_run_folder_reads_as_its_size_and_validation_curve(sweep):
    run = read_run(sweep / "64x2-s10")
    model = Transformer(load_config(sweep / "64x2-s10" / "final"))
    outside = {"embed_tokens", "lm_head"}  # counted independently: the model's own tensors
    expected = sum(p.numel() for name, p in model.named_parameters() if not outside & set(name.split(".")))
    assert run.n == expected and count_params(run.config, "all") == sum(p.numel() for p in model.parameters())
    assert run.steps == list(range(1, 11)) and run.tokens == [128 * s for s in run.steps]  # eval every step
    records = [json.loads(line) for line in (sweep / "64x2-s10" / "metrics.jsonl").read_text().splitlines()]
    assert run.loss == [r["val_loss"] for r in records if r["step"] > 0]
    assert run.finished and run.max_steps == 10
    assert read_run(sweep / "64x2-s10", params="all").n == count_params(run.config, "all")


def test_points_are_the_final_evaluations_or_every_one(sweep):
    runs = read_runs([sweep])  # the sweep folder stands for its six runs, in grid order
    assert [r.name for r in runs] == ["32x1-s5", "32x1-s10", "32x2-s5", "32x2-s10", "64x2-s5", "64x2-s10"]
    final = scaling_points(runs, "final")
    assert len(final.n) == 6 and sorted(set(final.d)) == [640, 1280]
    assert np.array_equal(final.loss, [r.loss[-1] for r in runs])
    every = scaling_points(runs, "all")
    assert len(every.n) == 5 * 3 + 10 * 3 and [len(g) for g in every.groups("runs")] == [5, 10] * 3
    assert len(every.groups("points")) == 45


def test_the_fit_command_reports_constants_budgets_predictions_and_a_plot(sweep, tmp_path, capsys):
    out_json, png = tmp_path / "fit.json", tmp_path / "scaling.png"
    assert main(["scaling", "fit", str(sweep), "--points", "all", "--bootstrap", "4", "--budget", "1e9",
                 "--predict", "1e5,1e7", "--json", str(out_json), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "6 runs, 45 points" in text and "compute-optimal at C = 1e+09" in text and "IsoFLOP" in text
    result = json.loads(out_json.read_text())
    constants = result["chinchilla"]["constants"]
    assert set(constants) == {"E", "A", "B", "alpha", "beta"} and result["chinchilla"]["bootstrap_fits"] <= 4
    budget = result["budgets"][0]
    assert 6 * budget["n_opt"] * budget["d_opt"] == pytest.approx(1e9)
    e, a, b, alpha, beta = (constants[k] for k in ("E", "A", "B", "alpha", "beta"))
    assert result["predictions"][0]["loss"] == pytest.approx(e + a / 1e5**alpha + b / 1e7**beta)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_fit_errors_are_one_line(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [([], "no run folders given"), ([str(empty)], "no metrics.jsonl records"),
             ([str(tmp_path / "missing")], "no such run folder"),
             ([str(sweep / "32x1-s5"), str(sweep / "64x2-s5")], "at least 6 points"),
             ([str(sweep / "32x1-s5"), "--metric", "val_accuracy"], "no 'val_accuracy'")]
    for args, message in cases:
        assert main(["scaling", "fit", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("llamakit scaling: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main(["scaling", "fit", str(sweep), "--predict", "1e9"])  # argparse: N,D needed
    assert "is not N,D" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["fit", "sweep"])
def test_help(action, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scaling", action, "--help"])
    assert exit_info.value.code == 0 and f"usage: llamakit scaling {action}" in capsys.readouterr().out


def test_sizes_and_compute_budgets_make_the_grid(prepared, tmp_path, capsys):  # noqa: F811
    base = parse_config(BASE)  # dim 64 with 8 heads (8 each), 4 KV heads
    assert parse_size("128x3", base) == parse_size("128x3x16x8", base)
    assert parse_size("24x2", base).n_heads == 3 and parse_size("24x2", base).n_kv_heads == 3  # 3 heads do not pair
    with pytest.raises(ConfigError, match="DIMxLAYERS"):
        parse_size("64-2", base)
    with pytest.raises(ConfigError, match="give the heads"):
        parse_size("36x2", base)
    runs = plan_sweep(BASE, ["32x1", "64x2"], flops=[1e9, 4e9], overrides=tiny(prepared))
    for run, budget in zip(runs, [1e9, 4e9] * 2):  # each size trains on about C / 6N tokens
        assert abs(6 * run.n * run.tokens - budget) <= 6 * run.n * 64 and run.flops == 6 * run.n * run.tokens
        assert run.tokens == 128 * run.steps  # whole steps of batch_size x seq_len tokens
    with pytest.raises(ConfigError, match="one of them"):
        plan_sweep(BASE, ["32x1"], tokens=[1e4], flops=[1e9])
    with pytest.raises(ConfigError, match="n_heads"):
        plan_sweep(BASE, ["32x1x3"], tokens=[1e4], overrides=tiny(prepared))  # 3 heads do not divide dim 32

    assert main(["scaling", "sweep", str(BASE), "--sizes", "32x1,64x2", "--tokens", "640", "--out", str(tmp_path / "g"),
                 "--set", f"data.path={prepared}", "--set", "data.seq_len=32", "--set", "train.batch_size=4",
                 "--set", "train.micro_batch_size=4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs into" in out and "32x1-s5" in out and "--model.dim 64 --model.n_layers 2" in out
    assert not (tmp_path / "g").exists()  # a dry run trains and writes nothing


@pytest.mark.slow
def test_a_sweep_trains_its_runs_then_skips_them_and_resumes_an_interrupted_one(prepared, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "llamakit", "scaling", "sweep", str(BASE), "--sizes", "32x1", "--tokens", "640,1280",
            "--out", str(out), "--jobs", "2", "--set", "checkpoint.keep_last=2"]
    args += [f"--set={key.removeprefix('--')}={value}" for key, value in zip(tiny(prepared)[::2], tiny(prepared)[1::2])
             if key != "--checkpoint.every"] + ["--set", "checkpoint.every=5"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    grid = json.loads((out / "grid.json").read_text())
    assert [(r["name"], r["status"]) for r in grid["runs"]] == [("32x1-s5", "finished"), ("32x1-s10", "finished")]
    assert finished(out / "32x1-s10", 10)

    # An interrupted run, as after a kill at step 7: final/ and step-10/ gone, step-5/ left. The rerun skips the
    # finished run and resumes the other from step 5, to the same losses.
    before = (out / "32x1-s5" / "metrics.jsonl").read_text()
    whole = (out / "32x1-s10" / "metrics.jsonl").read_text()
    for folder in ("final", "step-10"):
        shutil.rmtree(out / "32x1-s10" / folder)
    again = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "32x1-s10: finished" in again.stdout and "32x1-s5:" not in again.stdout
    assert (out / "32x1-s5" / "metrics.jsonl").read_text() == before and finished(out / "32x1-s10", 10)
    assert "resuming from" in (out / "logs" / "32x1-s10.log").read_text()
    losses = [{k: r[k] for k in ("step", "loss")} for r in map(json.loads, whole.splitlines()) if "loss" in r]
    again_losses = [{k: r[k] for k in ("step", "loss")}
                    for r in map(json.loads, (out / "32x1-s10" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert again_losses == losses
