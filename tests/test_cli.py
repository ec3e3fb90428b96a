"""The llamakit command: every subcommand's --help, convert/info end to end, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from llamakit import ModelConfig, Transformer, load_model, save_model
from llamakit.cli import COMMANDS, main


def run(*args):
    """Run the CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "llamakit", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: llamakit" in capsys.readouterr().out


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48)),
               tmp_path / "tiny", "llamakit")
    return tmp_path / "tiny"


def test_convert_round_trip(tiny_checkpoint, tmp_path):
    result = run("convert", tiny_checkpoint, tmp_path / "meta", "--to", "meta", "--shards", "2", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    assert run("convert", tmp_path / "meta", tmp_path / "hf", "--to", "hf").returncode == 0
    original, back = load_model(tiny_checkpoint), load_model(tmp_path / "hf")
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(original.embed_tokens.weight.bfloat16(), back.embed_tokens.weight)


def test_info_preset_and_path(tiny_checkpoint):
    result = run("info", "llama2-7b")
    assert result.returncode == 0 and "6,738,415,616" in result.stdout and "kv_cache_per_token" in result.stdout
    facts = json.loads(run("info", tiny_checkpoint, "--json").stdout)
    assert facts["format"] == "llamakit" and facts["n_kv_heads"] == "2"


def _edit_json(path, **changes):
    """Apply changes to a JSON file; a value of ... deletes the key."""
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not ...}))


def _two_llama2c_files(ckpt, tmp):
    for name in ("a.bin", "b.bin"):
        save_model(load_model(ckpt), tmp / "two" / name, "llama2c")


SETUPS = {  # extra damage done to a copy of the tiny checkpoint before running the command
    "bad type": lambda ckpt, tmp: _edit_json(ckpt / "config.json", llamakit=..., hidden_size="32"),
    "null heads": lambda ckpt, tmp: _edit_json(ckpt / "config.json", llamakit=..., num_attention_heads=None),
    "bad native block": lambda ckpt, tmp: _edit_json(ckpt / "config.json", llamakit={"format_version": 1}),
    "a file in the way": lambda ckpt, tmp: (tmp / "file").write_text("x"),
    "two llama2c files": _two_llama2c_files,
}


@pytest.mark.parametrize("setup, args, message", [
    (None, ["info", "no-such-thing"], "not a preset"),
    (None, ["convert", "missing-dir", "out", "--to", "hf"], "no such file or directory"),
    (None, ["convert", "{ckpt}", "{ckpt}", "--to", "hf"], "already exists"),
    (None, ["convert", "{ckpt}", "{tmp}/m", "--to", "meta", "--shards", "3"], "cannot split this model into 3 shards"),
    (None, ["convert", "{ckpt}", "{tmp}/m", "--to", "hf", "--shards", "2"], "--shards applies to --to meta only"),
    ("bad type", ["info", "{ckpt}"], "config.json: model config: dim must be a positive integer"),
    ("bad type", ["convert", "{ckpt}", "{tmp}/m", "--to", "hf"], "dim must be a positive integer"),
    ("null heads", ["convert", "{ckpt}", "{tmp}/m", "--to", "hf"], "config.json"),
    ("bad native block", ["info", "{ckpt}"], "the 'llamakit' block"),
    ("a file in the way", ["convert", "{ckpt}", "{tmp}/file/m", "--to", "hf"], "cannot create the output"),
    ("a file in the way", ["convert", "{ckpt}", "{tmp}/file", "--to", "hf", "--force"], "exists and is a file"),
    ("two llama2c files", ["info", "{tmp}/two"], "several llama2.c model files"),
])
def test_errors_are_one_line_without_traceback(setup, args, message, tiny_checkpoint, tmp_path):
    if setup:
        SETUPS[setup](tiny_checkpoint, tmp_path)
    result = run(*(a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--shards", "0"], ["--max-shard-size", "infGB"], ["--max-shard-size", "abc"]])
def test_bad_option_values_are_usage_errors(args, tiny_checkpoint, tmp_path):
    result = run("convert", tiny_checkpoint, tmp_path / "m", "--to", "meta", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and f"argument {args[0]}:" in result.stderr
