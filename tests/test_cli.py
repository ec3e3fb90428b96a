"""The llamakit command: every subcommand's --help, convert/info end to end, one-line errors."""

import errno
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

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
    assert "weights_bf16/fp16             12.55 GiB (13,476,831,232 B)" in result.stdout
    facts = json.loads(run("info", tiny_checkpoint, "--json").stdout)
    assert facts["format"] == "llamakit" and facts["tokenizer"] is None and facts["chat_format"] is None


def test_info_json_gives_numbers_and_booleans(capsys):
    assert main(["info", "llama3.2-1b", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["dim"] == 2048 and facts["n_kv_heads"] == 8 and facts["norm_eps"] == 1e-5
    assert facts["parameters"] == 1_235_814_400 and facts["weights_bf16/fp16"] == 2 * 1_235_814_400
    assert facts["tied_embeddings"] is True and facts["rope_scaling"]["factor"] == 32.0


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
    ("a file in the way", ["convert", "{ckpt}", "{tmp}/file", "--to", "hf"], "already exists"),
    (None, ["convert", "{ckpt}", "{tmp}/m", "--to", "meta", "--shards", "3"],
     "cannot split this model into 3 shards: 3 does not divide n_heads=4, n_kv_heads=2, vocab_size=64 or dim=32"),
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


@pytest.mark.parametrize("dst, force", [
    ("{ckpt}", True), ("{ckpt}/../tiny", True), ("{link}", True),  # the source itself, however spelled
    ("{ckpt}/inside", False), ("{ckpt}/inside", True), ("{tmp}", True),  # inside it, or holding it
])
def test_convert_refuses_to_write_over_or_into_its_source(tiny_checkpoint, tmp_path, capsys, dst, force):
    (tmp_path / "link").symlink_to(tiny_checkpoint)
    before = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    dst = dst.format(ckpt=tiny_checkpoint, tmp=tmp_path, link=tmp_path / "link")
    assert main(["convert", str(tiny_checkpoint), dst, "--to", "hf", *["--force"] * force]) == 1
    error = capsys.readouterr().err
    assert "the source" in error and "choose an output path outside it" in error and len(error.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()} == before


def test_convert_refuses_a_llama2c_file_written_over_itself(tiny_checkpoint, tmp_path, capsys):
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "m.bin"), "--to", "llama2c"]) == 0
    before = (tmp_path / "m.bin").read_bytes()
    assert main(["convert", str(tmp_path / "m.bin"), str(tmp_path / "m.bin"), "--to", "llama2c", "--force"]) == 1
    assert "the output is the source" in capsys.readouterr().err and (tmp_path / "m.bin").read_bytes() == before


FORMATS = ["hf", "meta", "llamakit", "llama2c"]
DISK_FULL = {  # what each writer raises when the disk fills, as seen on a full tmpfs
    "hf": ("llamakit.checkpoint.hf.save_file", "safetensors",
           "Error while serializing: I/O error: No space left on device (os error 28)"),
    "meta": ("torch.save", "torch", "[enforce fail at inline_container.cc:672] . unexpected pos 2496 vs 2390"),
    "llama2c": ("llamakit.checkpoint.llama2c.write_llama2c", "os", "No space left on device"),
}
DISK_FULL["llamakit"] = DISK_FULL["hf"]


def _assert_disk_full_reported(code, capsys, dst):
    error = capsys.readouterr().err
    assert code == 1 and error.startswith(f"llamakit convert: error: {dst}: the disk holding {dst.parent} is full")
    assert len(error.splitlines()) == 1 and not dst.exists() and list(dst.parent.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_onto_a_full_disk_says_so_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, fmt):
    target, kind, message = DISK_FULL[fmt]

    def write(*args, **kwargs):
        raise {"safetensors": SafetensorError(message), "torch": RuntimeError(message),
               "os": OSError(errno.ENOSPC, message)}[kind]

    monkeypatch.setattr(target, write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "m"
    _assert_disk_full_reported(main(["convert", str(tiny_checkpoint), str(dst), "--to", fmt]), capsys, dst)


def test_a_failed_torch_write_with_space_left_is_not_called_a_full_disk(tiny_checkpoint, tmp_path, monkeypatch):
    def write(*args, **kwargs):
        raise RuntimeError(DISK_FULL["meta"][2])

    monkeypatch.setattr("torch.save", write)
    with pytest.raises(RuntimeError, match="inline_container"):
        main(["convert", str(tiny_checkpoint), str(tmp_path / "m"), "--to", "meta"])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_onto_a_really_full_disk(tiny_checkpoint, small_disk, capsys, fmt):
    dst = small_disk / "m"
    _assert_disk_full_reported(main(["convert", str(tiny_checkpoint), str(dst), "--to", fmt]), capsys, dst)
