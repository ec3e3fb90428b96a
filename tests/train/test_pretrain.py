"""Pretraining end to end: loss falls, the result generates, a SIGKILLed run resumes bitwise, 2 processes == 1."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llamakit.cli import main
from llamakit.data import PrepareConfig, prepare
from llamakit.tokenizer.train import train_tokenizer
from tests.conftest import SHARED_ASSETS
from tests.data.corpus import prose
from tests.helpers import kill_when_exists

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
SHAKESPEARE = SHARED_ASSETS / "corpus" / "tinyshakespeare_input.txt"
# A model small enough for several subprocess runs per test: the checks are about the loop, not quality.
SMALL = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
         "--data.seq_len", "64", "--train.batch_size", "8", "--train.micro_batch_size", "2", "--train.device", "cpu",
         "--optim.warmup_steps", "5", "--log.tensorboard", "false", "--log.plot", "false", "--eval.batches", "2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Tiny Shakespeare (one document per blank-line-separated speech) or, without ../shared, generated prose."""
    root = tmp_path_factory.mktemp("corpus")
    if SHAKESPEARE.is_file():
        texts, inputs, separator = SHAKESPEARE.read_text().split("\n\n"), [str(SHAKESPEARE)], "\n\n"
    else:
        corpus = root / "prose.txt"
        corpus.write_text("\n\n".join(prose(120, seed) for seed in range(600)))
        texts, inputs, separator = corpus.read_text().split("\n\n"), [str(corpus)], "\n\n"
    tokenizer = train_tokenizer(texts, root / "tok.model", 512, num_threads=1)
    prepare(PrepareConfig(inputs=inputs, output=root / "data", tokenizer=tokenizer, separator=separator,
                          val_fraction=0.05, workers=1))
    return root / "data"


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamakit", "pretrain", str(TINY), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # the same threads: the same float sums


def test_pretraining_lowers_validation_loss_and_the_result_generates(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", str(TINY), "--data.path", str(prepared), "--checkpoint.out_dir", str(run),
                 "--train.max_steps", "60", "--eval.every", "30", "--checkpoint.every", "30",
                 "--train.device", "cpu"]) == 0
    val = _losses(run, "val_loss")
    assert sorted(val) == [0, 30, 60]
    assert val[60] < 0.7 * val[0], val  # from ~ln(512) = 6.2 to well below
    assert (run / "loss.png").stat().st_size > 1000 and (run / "tensorboard").is_dir()
    assert {p.name for p in (run / "final").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(run / "final"), "--temperature", "0", "--max-new-tokens", "20",
                 "First Citizen:"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("First Citizen:") and out.removeprefix("First Citizen:").strip()  # prompt + continuation

    from llamakit.generate import Llama

    llama = Llama.build(str(run / "final"), str(run / "final" / "tokenizer.model"), max_seq_len=128, max_batch_size=1)
    out = llama.text_completion(["ROMEO:"], max_gen_len=8, temperature=0)
    assert isinstance(out[0]["generation"], str) and out[0]["generation"]


def test_a_run_killed_with_sigkill_resumes_with_bitwise_identical_losses(prepared, tmp_path):
    steps = ["--train.max_steps", "40", "--checkpoint.every", "5", "--eval.every", "10", "--data.path", str(prepared)]
    whole = tmp_path / "whole"
    subprocess.run(_command(*SMALL, *steps, "--checkpoint.out_dir", str(whole)), env=ENV, check=True,
                   capture_output=True)

    broken = tmp_path / "broken"
    kill_when_exists(_command(*SMALL, *steps, "--checkpoint.out_dir", str(broken)), broken / "step-10", ENV)
    assert not (broken / "final").exists()
    killed_at = max(_losses(broken))
    assert 10 <= killed_at < 40

    resumed = subprocess.run(_command(*SMALL, *steps, "--checkpoint.out_dir", str(broken), "--resume"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(broken) == _losses(whole)  # every step, bit for bit
    assert _losses(broken, "val_loss") == _losses(whole, "val_loss")
    assert sorted(p.name for p in broken.glob("step-*")) == ["step-35", "step-40"]  # keep_last = 2, the last step


def test_two_processes_give_the_losses_of_one(prepared, tmp_path):
    args = [*SMALL, "--train.max_steps", "6", "--eval.every", "3", "--checkpoint.every", "0", "--data.path",
            str(prepared)]
    one = tmp_path / "one"
    subprocess.run(_command(*args, "--checkpoint.out_dir", str(one)), env=ENV, check=True, capture_output=True)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "llamakit", "pretrain", str(TINY), *args, "--checkpoint.out_dir", str(two)]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("loss", "val_loss"):
        a, b = _losses(one, key), _losses(two, key)
        assert a.keys() == b.keys()
        assert all(abs(a[s] - b[s]) < 1e-5 * max(1, abs(a[s])) for s in a), (a, b)
    assert (two / "final" / "model.safetensors").is_file()


def test_bad_runs_fail_in_one_line(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["pretrain", str(TINY), *SMALL, "--data.path", str(prepared), "--checkpoint.out_dir", str(run)]
    assert main([*base, "--train.max_steps", "2", "--checkpoint.every", "1"]) == 0
    capsys.readouterr()
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(prepared, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    cases = [
        ([*base, "--train.max_steps", "3"], "pass --resume"),  # the folder holds another run
        ([*base[:-1], str(tmp_path / "new"), "--model.vocab_size", "100"],
         "model.vocab_size=100 is smaller than the 512 tokens of the data's tokenizer"),
        ([*base, "--train.max_steps", "3", "--resume", "--optim.lr", "0.5"], "optim.lr"),  # not the same run
        (["pretrain", str(TINY), "--optim.learning_rate", "1"], "learning_rate"),
        (["pretrain", str(TINY), "--data.path", str(tmp_path / "nothing")], "llamakit prepare"),
        (["pretrain", str(TINY), *SMALL, "--data.path", str(no_tokenizer), "--checkpoint.out_dir", str(tmp_path / "x")],
         f"{no_tokenizer / 'tokenizer.model'} is missing but {no_tokenizer / 'meta.json'} records sha256"),
        (["pretrain", str(tmp_path / "none.yaml")], "no such config"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_pretrain_config_help_lists_resume(capsys):
    with pytest.raises(SystemExit) as done:
        main(["pretrain", str(TINY), "--help"])
    assert done.value.code == 0 and "--resume" in capsys.readouterr().out


def _snapshot(run: Path) -> dict[str, int]:
    """Every file of a run folder with its modification time."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_retrained_or_overwritten(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["pretrain", str(TINY), *SMALL, "--data.path", str(prepared), "--checkpoint.out_dir", str(run),
            "--checkpoint.every", "0", "--eval.every", "0"]
    assert main([*base, "--train.max_steps", "3"]) == 0
    assert sorted(p.name for p in run.glob("step-*")) == ["step-3"]  # the last step is checkpointed
    before = _snapshot(run)
    capsys.readouterr()

    assert main([*base, "--train.max_steps", "3", "--optim.lr", "0.0005"]) == 1  # no --resume: refused
    assert "already holds a run" in capsys.readouterr().err and not (run / ".lock").exists()
    assert main([*base, "--train.max_steps", "3", "--resume"]) == 0  # finished: nothing to do (demo.sh's rerun)
    assert str(run / "final") in capsys.readouterr().out
    assert _snapshot(run) == before  # final/, metrics.jsonl, train_config.yaml untouched

    assert main([*base, "--train.max_steps", "5", "--resume"]) == 0  # a raised max_steps continues the run
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5] and (run / "step-5").is_dir()
    assert _snapshot(run)["final/model.safetensors"] != before["final/model.safetensors"]

    shutil.rmtree(run / "final")  # killed after the last checkpoint, before final/: --resume only writes final/
    metrics = (run / "metrics.jsonl").read_text()
    assert main([*base, "--train.max_steps", "5", "--resume"]) == 0
    assert (run / "final" / "model.safetensors").is_file() and (run / "metrics.jsonl").read_text() == metrics

    for step in run.glob("step-*"):  # a folder holding only final/ is a run too
        shutil.rmtree(step)
    capsys.readouterr()
    assert main([*base, "--train.max_steps", "5"]) == 1
    err = capsys.readouterr().err
    assert "already holds a run (latest: final/)" in err and err.count("\n") == 1, err
    assert main([*base, "--train.max_steps", "5", "--resume"]) == 0
    assert not (run / ".lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_run_owns_its_folder_and_takes_over_what_a_killed_run_left(prepared, tmp_path, capsys, caplog,
                                                                     monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    host = socket.gethostname()
    argv = ["pretrain", str(TINY), *SMALL, "--data.path", str(prepared), "--checkpoint.out_dir", str(run),
            "--train.max_steps", "2", "--checkpoint.every", "1", "--eval.every", "0"]
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live run holds the folder
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"in use by another run (pid {os.getppid()} on {host})" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no config, no metrics

    dead = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": dead, "host": host}))  # a run killed with SIGKILL
    for leftover in (f".step-6.tmp-{dead}", f".final.old-{dead}"):  # killed mid-save
        (run / leftover).mkdir()
        (run / leftover / "optimizer.pt").write_bytes(b"x" * 100)
    assert main(argv) == 0
    assert f"taking over the lock of pid {dead}" in caplog.text
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # lock released, leftovers gone

    def interrupted(*args, **kwargs):
        assert (run / ".lock").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr("llamakit.train.runner.train", interrupted)
    assert main([*argv, "--train.max_steps", "3", "--resume"]) == 130  # Ctrl-C releases the lock too
    assert not (run / ".lock").exists()


def test_every_process_fails_in_one_line_when_another_run_holds_the_folder(prepared, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
                "-m", "llamakit", "pretrain", str(TINY), *SMALL, "--data.path", str(prepared),
                "--checkpoint.out_dir", str(run), "--train.max_steps", "1"]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "is in use by another run (pid" in line]
    assert len(lines) == 2 and all(line.startswith("llamakit pretrain: error:") for line in lines), done.stderr
    assert "llamakit/train" not in done.stderr  # no traceback of ours (torchrun adds its own summary)
