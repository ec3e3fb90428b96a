"""The two example scripts, run with torchrun exactly as Meta's README shows, on Meta-format tinyllamas folders."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamakit import Llama, load_model, save_model
from llamakit.tokenizer.chat import UNSAFE_REPLY

REPO = Path(__file__).resolve().parents[2]
SEPARATOR = "\n\n==================================\n\n"
# One thread per process: the model is tiny, and on a busy two-core machine two OpenMP threads per
# process make every matmul wait for a descheduled thread (measured 30x slower).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def example(name: str):
    """Import an example script as a module (its main() only runs as __main__)."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def meta(assets, tmp_path_factory) -> dict[str, Path]:
    """stories260K as Meta folders of 1 and 2 consolidated.NN.pth shards, and its tokenizer."""
    tiny = assets / "tinyllamas"
    folder = tmp_path_factory.mktemp("meta-examples")
    model = load_model(tiny / "stories260K.bin")
    for shards in (1, 2):
        save_model(model, folder / f"{shards}-shards", "meta", tokenizer=tiny / "tok512.model", shards=shards)
    assert len(list((folder / "2-shards").glob("consolidated.*.pth"))) == 2
    return {"1": folder / "1-shards", "2": folder / "2-shards", "tok": tiny / "tok512.model"}


def torchrun(nproc: int, script: str, ckpt_dir: Path, tokenizer: Path, *args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N script --ckpt_dir DIR/ --tokenizer_path TOK ...` from the repo root."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script,
               "--ckpt_dir", f"{ckpt_dir}/", "--tokenizer_path", str(tokenizer), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def text_blocks(stdout: str, prompts: list[str]) -> list[str]:
    """Each prompt's `> ` completion, checking that every prompt is printed once, in order."""
    *blocks, rest = stdout.split(SEPARATOR)
    assert rest == "" and len(blocks) == len(prompts), stdout
    completions = []
    for prompt, block in zip(prompts, blocks):
        assert block.startswith(f"{prompt}\n> "), block
        completions.append(block.removeprefix(f"{prompt}\n> "))
    return completions


def test_text_example_greedy_equals_meta_api(meta):
    prompts = example("example_text_completion").PROMPTS
    result = torchrun(1, "example_text_completion.py", meta["1"], meta["tok"], "--max_seq_len", 128,
                      "--max_batch_size", 4, "--temperature", 0)
    llama = Llama.build(meta["1"], meta["tok"], max_seq_len=128, max_batch_size=4)
    expected = [r["generation"] for r in llama.text_completion(prompts, temperature=0, max_gen_len=64)]
    assert text_blocks(result.stdout, prompts) == expected
    assert all(len(text.split()) > 10 for text in expected)


def test_text_example_with_two_shards_on_one_or_two_processes(meta):
    prompts = example("example_text_completion").PROMPTS
    args = ("--max_seq_len", 128, "--max_batch_size", 4)
    one = torchrun(1, "example_text_completion.py", meta["2"], meta["tok"], *args)
    two = torchrun(2, "example_text_completion.py", meta["2"], meta["tok"], *args)
    # Meta's defaults (temperature 0.6, top_p 0.9, seed 1) sample the same tokens in every process,
    # and only rank 0 prints them.
    assert two.stdout == one.stdout
    llama = Llama.build(meta["2"], meta["tok"], max_seq_len=128, max_batch_size=4)
    assert text_blocks(one.stdout, prompts) == [r["generation"] for r in llama.text_completion(prompts, max_gen_len=64)]


def test_chat_example(meta):
    dialogs = example("example_chat_completion").DIALOGS
    result = torchrun(1, "example_chat_completion.py", meta["1"], meta["tok"], "--max_seq_len", 512,
                      "--max_batch_size", 6)
    llama = Llama.build(meta["1"], meta["tok"], max_seq_len=512, max_batch_size=6)
    replies = [r["generation"]["content"] for r in llama.chat_completion(dialogs)]  # Meta's defaults, seed 1
    assert replies[-1] == UNSAFE_REPLY and all(replies[:-1])

    *blocks, rest = result.stdout.split(SEPARATOR)
    assert rest == "" and len(blocks) == len(dialogs), result.stdout
    for dialog, reply, block in zip(dialogs, replies, blocks):
        shown = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in dialog)
        assert block == f"{shown}> Assistant: {reply}", block
