"""Pretraining end to end: loss falls, the result generates, a SIGKILLed run resumes bitwise, 2 processes == 1."""

import json
import os
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
    assert len(capsys.readouterr().out.strip()) > len("First Citizen:")

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
    assert sorted(p.name for p in broken.glob("step-*")) == ["step-30", "step-35"]  # keep_last = 2


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
    cases = [
        ([*base, "--train.max_steps", "3"], "pass --resume"),  # the folder holds another run
        ([*base, "--train.max_steps", "3", "--resume", "--optim.lr", "0.5"], "optim.lr"),  # not the same run
        (["pretrain", str(TINY), "--optim.learning_rate", "1"], "learning_rate"),
        (["pretrain", str(TINY), "--data.path", str(tmp_path / "nothing")], "llamakit prepare"),
        (["pretrain", str(tmp_path / "none.yaml")], "no such config"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
