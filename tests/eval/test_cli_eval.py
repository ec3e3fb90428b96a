"""`llamakit eval` end to end on stories260K: a table, a traceable JSON; bad input fails in one line, keeping results."""

import hashlib
import json
import subprocess
import sys

import pytest

from llamakit.cli import main


@pytest.fixture(scope="module")
def model_args(assets):
    tiny = assets / "tinyllamas"
    return ["--checkpoint", str(tiny / "stories260K.bin"), "--tokenizer", str(tiny / "tok512.model"), "--no-progress"]


def eval_cli(capsys, *args):
    """Run `llamakit eval` in this process; (exit code, stdout, stderr)."""
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_table_and_json(assets, model_args, tmp_path):
    output = tmp_path / "results.json"
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little dog. He liked to run.\n" * 40)
    result = subprocess.run([sys.executable, "-m", "llamakit", "eval", *model_args, "--tasks", "piqa,hellaswag,mmlu",
                             "--data-dir", str(assets / "eval"), "--limit", "3", "--output", str(output),
                             "--text", str(text), "--stride", "256"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "±", "stderr", "n"]
    for task, metric in [("piqa", "acc"), ("piqa", "acc_norm"), ("hellaswag", "acc_norm"), ("mmlu", "acc_macro"),
                         ("perplexity", "token_perplexity"), ("perplexity", "byte_perplexity")]:
        assert any(line.split()[:2] == [task, metric] for line in lines), (task, metric)
    data = json.loads(output.read_text())
    assert data["status"] == "complete" and list(data["results"]) == ["piqa", "hellaswag", "mmlu", "perplexity"]
    settings = data["settings"]
    checkpoint = assets / "tinyllamas" / "stories260K.bin"
    assert settings["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert settings["seed"] == 0 and settings["window"] == 512 and "length in characters" in settings["acc_norm"]
    piqa = data["results"]["piqa"]
    assert piqa["settings"]["template_version"] == "1" and piqa["settings"]["n_shot"] == 0
    assert len(piqa["examples"]) == 3 and piqa["metrics"]["acc"] == sum(e["acc"] for e in piqa["examples"]) / 3
    mmlu = data["results"]["mmlu"]
    assert len(mmlu["subjects"]) == 57 and mmlu["metrics"]["n"] == 171 and "n_shot" in mmlu["examples"][0]
    ppl = data["results"]["perplexity"]
    assert ppl["settings"]["stride"] == 256 and ppl["metrics"]["tokens"] > 512 and ppl["metrics"]["windows"] > 1
    assert ppl["metrics"]["byte_perplexity"] == pytest.approx(2 ** ppl["metrics"]["bits_per_byte"])
    assert all(r["status"] == "complete" for r in data["results"].values())


def test_unknown_task(model_args, capsys):
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "piqa,hellaswagg", "--data-dir", ".")
    assert code == 1 and err.count("\n") == 1 and "unknown task hellaswagg; choose from" in err


def test_missing_data(model_args, capsys, tmp_path):
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "piqa", "--data", f"piqa={tmp_path / 'nope.jsonl'}")
    assert code == 1 and err.count("\n") == 1 and "nope.jsonl does not exist" in err
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "boolq")
    assert code == 1 and "no data for task boolq: pass --data boolq=PATH or --data-dir" in err
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "piqa", "--data-dir", tmp_path)
    assert code == 1 and "piqa" in err and err.count("\n") == 1


def test_malformed_rows(model_args, capsys, tmp_path):
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "answer": true}\n{"question": "q"}\n')
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "boolq", "--data", f"boolq={bad}")
    assert code == 1 and err.count("\n") == 1 and "dev.jsonl:2: missing field 'passage'" in err


def long_ending_hellaswag(path):
    path.write_text("A dog:\n0\n" + "ran." + " and then he ran" * 200 + "\nsat.\nslept.\nate.\n")
    return path


def test_continuation_longer_than_the_window(model_args, capsys, tmp_path):
    hellaswag = long_ending_hellaswag(tmp_path / "h.txt")
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "hellaswag", "--data", f"hellaswag={hellaswag}")
    assert code == 1 and err.count("\n") == 1 and "does not fit the 512-token window" in err


def test_a_failing_task_keeps_the_finished_ones(assets, model_args, capsys, tmp_path):
    output = tmp_path / "results.json"
    hellaswag = long_ending_hellaswag(tmp_path / "h.txt")
    code, out, err = eval_cli(capsys, *model_args, "--tasks", "piqa,hellaswag", "--limit", "4", "--output", output,
                              "--data", f"piqa={assets / 'eval' / 'piqa' / 'valid.jsonl'}",
                              "--data", f"hellaswag={hellaswag}")
    assert code == 1 and err.count("\n") == 1 and f"finished tasks are saved in {output}" in err
    assert [line.split()[:2] for line in out.splitlines()[2:4]] == [["piqa", "acc"], ["piqa", "acc_norm"]]
    data = json.loads(output.read_text())
    assert data["status"] == "failed" and list(data["results"]) == ["piqa", "hellaswag"]
    assert data["results"]["hellaswag"]["status"] == "failed"
    assert data["results"]["hellaswag"]["error"].startswith("a continuation of")
    assert len(data["results"]["piqa"]["examples"]) == 4


def test_ctrl_c_keeps_the_finished_tasks_and_prints_their_table(assets, model_args, capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llamakit.eval.runner.text_perplexity", interrupted)  # Ctrl-C during the second task
    output, text = tmp_path / "results.json", tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little dog.\n")
    code, out, err = eval_cli(capsys, *model_args, "--tasks", "piqa", "--limit", "2", "--output", output,
                              "--data", f"piqa={assets / 'eval' / 'piqa' / 'valid.jsonl'}", "--text", text)
    assert code == 130 and err == "llamakit eval: interrupted\n"
    rows = [line.split()[:2] for line in out.splitlines()[2:] if line.startswith(("piqa", "perplexity"))]
    assert rows == [["piqa", "acc"], ["piqa", "acc_norm"]] and f"results and per-example records: {output}" in out
    data = json.loads(output.read_text())
    assert data["status"] == "failed" and "error" not in data
    assert data["results"]["piqa"]["status"] == "complete" and len(data["results"]["piqa"]["examples"]) == 2
    assert data["results"]["perplexity"] == {"status": "failed", "error": "interrupted"}


@pytest.mark.parametrize("option", ["--window", "--max-seq-len"])
def test_a_window_beyond_the_models_context_is_refused(model_args, capsys, caplog, tmp_path, option):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little dog. He liked to run.\n" * 40)
    code, out, err = eval_cli(capsys, *model_args, "--text", text, option, "100000")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"{option} 100000 is beyond the model's 512-token context" in err and "--extend-context" in err
    code, out, err = eval_cli(capsys, *model_args, "--text", text, option, "1024", "--extend-context")
    assert code == 0 and f"{option} 1024 is beyond the model's 512-token context" in caplog.text  # a warning
    assert any(line.split()[:2] == ["perplexity", "token_perplexity"] for line in out.splitlines())


def test_shots_for_a_zero_shot_task(model_args, capsys, assets):
    code, _, err = eval_cli(capsys, *model_args, "--tasks", "piqa", "--data-dir", assets / "eval", "--num-fewshot", "3")
    assert code == 1 and "piqa is evaluated zero-shot" in err
