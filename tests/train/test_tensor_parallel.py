"""Tensor-parallel training under torchrun (gloo on CPU): TP=2 and TP x FSDP 2 x 2 give the one-process losses
and weights; a run saved under one layout resumes exactly under another."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port
from tests.train.test_pretrain import SMALL, TINY, _losses, prepared  # noqa: F401 (the shared prepared corpus)

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
STEPS = ["--train.max_steps", "10", "--eval.every", "5", "--checkpoint.every", "5"]


def pretrain(nproc: int, out: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(nproc), "--master_port", str(free_port())]
    command = [*launcher, "-m", "llamakit", "pretrain", str(TINY), *SMALL, *STEPS, "--data.path", str(data),
               "--checkpoint.out_dir", str(out), *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)


def assert_same_run(run: Path, ref: Path) -> None:
    for key in ("loss", "val_loss", "grad_norm"):
        got, want = _losses(run, key), _losses(ref, key)
        assert got.keys() == want.keys(), key
        assert all(abs(got[s] - want[s]) < 1e-5 for s in want), (key, got, want)
    got, want = load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def one(prepared, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("tp-train") / "one"
    done = pretrain(1, run, prepared)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_two_tensor_parallel_processes_train_like_one(prepared, one, tmp_path):  # noqa: F811
    run = tmp_path / "tp2"
    done = pretrain(2, run, prepared, "--train.tensor_parallel", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, one)


def test_tensor_parallel_times_fsdp_on_four_processes(prepared, one, tmp_path):  # noqa: F811
    """A 2 x 2 mesh: FSDP2 shards each tensor-parallel share across the 2 data-parallel replicas, which read
    different micro-batches of the same global batch."""
    run = tmp_path / "tp2-fsdp2"
    done = pretrain(4, run, prepared, "--train.tensor_parallel", "2", "--train.parallel", "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, one)


def test_a_tensor_parallel_run_resumes_on_one_process(prepared, one, tmp_path):  # noqa: F811
    """Checkpoints hold full state dicts: 5 steps on TP=2, the last 5 on one process = 10 steps on one."""
    run = tmp_path / "moved"
    first = pretrain(2, run, prepared, "--train.tensor_parallel", "2", "--train.max_steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = pretrain(1, run, prepared, "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert_same_run(run, one)


@pytest.mark.slow  # the layout check itself is tested in tests/test_runtime.py
def test_a_layout_the_job_cannot_hold_is_one_line(prepared, tmp_path):  # noqa: F811
    done = pretrain(2, tmp_path / "bad", prepared, "--train.tensor_parallel", "3", "--train.max_steps", "1")
    assert done.returncode != 0
    assert ("llamakit pretrain: error: train.tensor_parallel=3 x train.pipeline_parallel=1 does not divide the 2 "
            "processes of this job") in done.stderr
    assert "llamakit/" not in done.stderr  # no traceback of ours (torchrun adds its own summary)
