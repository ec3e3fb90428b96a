"""`llamakit dpo` on the real stories260K: ln 2 at the start, learning a clear preference, exact resume after a kill."""

import json
import math
import os
import subprocess
import sys

import pytest

from llamakit.train import parse_config
from llamakit.train.dpo import REFERENCE_FILE, DPORunConfig, dpo
from tests.helpers import kill_when_exists, write_clear_preferences

CONFIG = "configs/dpo/tiny-dpo.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _args(assets, out_dir, data, *overrides):
    return ["--model.path", str(assets / "tinyllamas" / "stories260K.bin"),
            "--model.tokenizer", str(assets / "tinyllamas" / "tok512.model"), "--data.path", str(data),
            "--data.max_examples", "72", "--data.seq_len", "128", "--data.val_fraction", "0.12",
            "--train.batch_size", "8", "--train.micro_batch_size", "8", "--train.device", "cpu",
            "--eval.every", "3", "--checkpoint.every", "3", "--log.every", "1", "--log.tensorboard", "false",
            "--log.plot", "false", "--checkpoint.out_dir", str(out_dir), *overrides]


def _metrics(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_dpo_starts_at_ln2_and_learns_a_clear_preference(assets, tmp_path):
    data = write_clear_preferences(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    dpo(parse_config(CONFIG, _args(assets, out, data, "--train.max_steps", "6"), DPORunConfig))
    loss, val = _metrics(out, "loss"), _metrics(out, "val_loss")
    assert loss[1] == pytest.approx(math.log(2), abs=1e-6) and val[0] == pytest.approx(math.log(2), abs=1e-6)
    assert val[6] < 0.5 and _metrics(out, "val_reward_accuracy")[6] == 1.0
    assert (out / REFERENCE_FILE).is_file() and (out / "final" / "adapter_config.json").is_file()


def test_a_killed_run_resumes_with_the_stored_reference_and_identical_losses(assets, tmp_path):
    hh = assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz"

    def command(out):
        return [sys.executable, "-m", "llamakit", "dpo", CONFIG, *_args(assets, out, hh, "--train.max_steps", "6")]

    whole = tmp_path / "whole"
    subprocess.run(command(whole), env=ENV, check=True, capture_output=True)
    broken = tmp_path / "broken"
    kill_when_exists(command(broken), broken / "step-3", ENV)
    made = (broken / REFERENCE_FILE).stat().st_mtime_ns
    resumed = subprocess.run([*command(broken), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (broken / REFERENCE_FILE).stat().st_mtime_ns == made  # read back, not computed again
    assert _metrics(broken, "loss") == _metrics(whole, "loss")
    assert _metrics(broken, "val_loss") == _metrics(whole, "val_loss")


def test_two_processes_give_the_losses_of_one(assets, tmp_path):
    hh = assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz"
    args = ["--train.max_steps", "4", "--eval.every", "2", "--eval.batches", "1", "--checkpoint.every", "0",
            "--train.micro_batch_size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "llamakit", "dpo", CONFIG, *_args(assets, one, hh, *args)], env=ENV,
                   check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29536",
                "-m", "llamakit", "dpo", CONFIG, *_args(assets, two, hh, *args)]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("loss", "val_loss", "reward_margin"):
        a, b = _metrics(one, key), _metrics(two, key)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 * max(1, abs(a[s])) for s in a), (key, a, b)
    assert (two / "final" / "adapter_model.safetensors").is_file() and (two / REFERENCE_FILE).is_file()
