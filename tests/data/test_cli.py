"""`llamakit tokenizer train` and `llamakit prepare` end to end, and their one-line errors."""

import os
import signal
import subprocess
import sys
import time

import pytest

from llamakit.cli import main
from llamakit.data import TokenShards
from llamakit.tokenizer import load_tokenizer
from tests.data.corpus import prose, write_jsonl


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(prose(150, i) + f"\nIn {1900 + i} there were {i * 123} apples.")
    write_jsonl(folder / "more.jsonl", [prose(100, 10 + i) for i in range(6)])
    return folder


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_prepare(corpus, tmp_path, capsys):
    tok = tmp_path / "tok.model"
    code, out, _ = run(capsys, "tokenizer", "train", corpus, "--output", tok, "--vocab-size", 400,
                       "--special-token", "<|endoftext|>", "--workers", 1)
    assert code == 0 and f"wrote a 400-token tokenizer to {tok}" in out
    assert load_tokenizer(tok).encode("<|endoftext|>")[-1] == 3  # the first id after unk, bos, eos

    args = ["prepare", corpus, "--tokenizer", tok, "--output", tmp_path / "out", "--workers", 1, "--val-fraction",
            0.2, "--shard-tokens", 1000, "--languages", "en"]
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["stage", "documents", "chars"] and lines[1].split()[:4] == ["read", "(7", "files)", "12"]
    assert any(line.split()[:2] == ["kept", "12"] for line in lines) and f"prepared: {tmp_path / 'out'}" in out
    train = TokenShards(tmp_path / "out")
    assert any(line.split()[:1] == ["train"] and line.split()[-1] == f"{len(train):,}" for line in lines)

    code, out, _ = run(capsys, *args)
    assert code == 0 and "already prepared with these inputs and settings" in out


@pytest.mark.parametrize("args, message", [
    (["prepare", "{tmp}/nope", "--tokenizer", "{tok}", "--output", "{tmp}/out"], "input {tmp}/nope does not exist"),
    (["prepare", "{tmp}/bad.jsonl", "--tokenizer", "{tok}", "--output", "{tmp}/out"], "bad.jsonl:2: has no 'text' field"),
    (["prepare", "{corpus}", "--tokenizer", "{tmp}/missing.model", "--output", "{tmp}/out"], "does not exist"),
    (["prepare", "{corpus}", "--tokenizer", "{tok}", "--output", "{tmp}/out", "--min-chars", "100000"],
     "no documents are left after the quality filters"),
    (["tokenizer", "train", "{corpus}", "--output", "{tmp}/t.model", "--vocab-size", "100"], "use at least 260"),
    (["tokenizer", "train", "{tmp}/bad.jsonl", "--output", "{tmp}/t.model", "--vocab-size", "300"], "bad.jsonl:2:"),
    (["tokenizer", "train", "{tmp}/*.nothing", "--output", "{tmp}/t.model", "--vocab-size", "300"], "matches no files"),
])
def test_errors_are_one_line(args, message, corpus, tokenizer_file, tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", ["fine"]).open("a").write('{"body": "no text field"}\n')
    fill = dict(tmp=tmp_path, tok=tokenizer_file, corpus=corpus)
    code, _, err = run(capsys, *(a.format(**fill) for a in args))
    assert code == 1 and message.format(**fill) in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"llamakit {args[0]}: error:")


def test_changed_settings_need_force(corpus, tokenizer_file, tmp_path, capsys):
    args = ["prepare", corpus, "--tokenizer", tokenizer_file, "--output", tmp_path / "out", "--workers", 1]
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, *args, "--dedup-threshold", 0.9)
    assert code == 1 and "dedup.threshold: 0.8 -> 0.9" in err and "pass --force" in err
    assert run(capsys, *args, "--dedup-threshold", 0.9, "--force")[0] == 0


def test_tokenizer_train_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--help"])
    assert exit_info.value.code == 0 and "--vocab-size" in capsys.readouterr().out


# `llamakit prepare ARGS...` whose workers stop for a minute on their first chunk, after touching a marker file.
SLOW_TOKENIZING = """
import importlib, sys, time
from pathlib import Path
from llamakit.cli import main
prepare = importlib.import_module("llamakit.data.prepare")  # the package's prepare() hides the module
encode = prepare.encode_documents
def slow_encode(texts, **kwargs):
    Path(sys.argv[1]).touch()
    time.sleep(60)
    return encode(texts, **kwargs)
prepare.encode_documents = slow_encode
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_while_tokenizing_prints_one_line(corpus, tokenizer_file, tmp_path):
    marker, out = tmp_path / "tokenizing", tmp_path / "out"
    args = ["prepare", corpus, "--tokenizer", tokenizer_file, "--output", out, "--workers", "2"]
    # A session of its own: Ctrl-C in a terminal sends SIGINT to the whole process group, workers included.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TOKENIZING, marker, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=60)  # tokenizing has started
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "llamakit prepare: interrupted\n")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tokenizing"]
