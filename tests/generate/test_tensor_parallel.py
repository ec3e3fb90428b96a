"""Tensor-parallel inference under torchrun (gloo on CPU): greedy tokens equal one process's, each process holding
about 1/N of the weights and reading only its share; Meta's 2-shard checkpoints (Llama 2 and Llama 3 splits)
loaded one file per process; more processes than key/value heads (MQA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamakit import Llama, load_model, save_model
from llamakit.cli import main
from llamakit.model import Transformer

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = ["Once upon a time", "The little dog"]
WORKER = r"""
import json, sys
from pathlib import Path
import llamakit.checkpoint.meta as meta_module
import llamakit.checkpoint.sharded as sharded
from llamakit import Llama
from llamakit.model.tensor_parallel import resident_weight_bytes

opened = []
def recording(load):
    def wrapper(path):
        opened.append(Path(path).name)
        return load(path)
    return wrapper
sharded.torch_load, meta_module.torch_load = recording(sharded.torch_load), recording(meta_module.torch_load)

tokenizer, out, prompts, checkpoints = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
results = {}
for ckpt in checkpoints:
    opened.clear()
    llama = Llama.build(ckpt, tokenizer, max_seq_len=96, max_batch_size=2)
    texts = llama.text_completion(prompts, temperature=0, max_gen_len=40, logprobs=True)
    results[ckpt] = {"tokens": [t["tokens"] for t in texts], "bytes": resident_weight_bytes(llama.model),
                     "files": sorted(set(opened)), "cache_heads": llama.cache.k.shape[2]}
rank = __import__("torch.distributed").distributed.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps(results))
"""


def torchrun(nproc: int, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, input=stdin)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def variant(model: Transformer, **changes) -> Transformer:
    """stories260K with another config: real weights give peaked next-token distributions, so greedy tokens do not
    hinge on float rounding. n_kv_heads=1 averages the key/value heads into one (MQA)."""
    state = model.state_dict()
    if changes.get("n_kv_heads") == 1:
        for name in [n for n in state if n.endswith(("k_proj.weight", "v_proj.weight"))]:
            w = state[name]
            state[name] = w.view(model.config.kv_heads, -1, w.size(1)).mean(0)  # (D, dim)
    new = Transformer(model.config.replace(**changes))
    new.load_state_dict(state)
    return new


@pytest.fixture(scope="module")
def checkpoints(assets, tmp_path_factory) -> dict[str, Path]:
    """stories260K (8 heads, 4 key/value heads, tied) as a 2-shard Meta checkpoint (Llama 2's split: the embedding
    on its width), as a Llama 3-style one (rope_theta 500000: the embedding split on the vocabulary), and with one
    key/value head (MQA) as safetensors."""
    folder, tok = tmp_path_factory.mktemp("tp"), assets / "tinyllamas" / "tok512.model"
    stories = load_model(assets / "tinyllamas" / "stories260K.bin")
    paths = {"llama2": folder / "llama2-meta2", "llama3": folder / "llama3-meta2", "mqa": folder / "mqa"}
    save_model(stories, paths["llama2"], "meta", tokenizer=tok, shards=2)
    save_model(variant(stories, rope_theta=500000.0), paths["llama3"], "meta", tokenizer=tok, shards=2)
    save_model(variant(stories, n_kv_heads=1), paths["mqa"], "llamakit", tokenizer=tok)
    for name in ("llama2", "llama3"):  # the splits Meta's Llama 2 and Llama 3 code make
        embedding = torch.load(paths[name] / "consolidated.00.pth", weights_only=True)["tok_embeddings.weight"]
        assert embedding.shape == ((512, 32) if name == "llama2" else (256, 64))
    return {**paths, "tok": tok}


def one_process(ckpt: Path, tok: Path) -> dict:
    llama = Llama.build(ckpt, tok, max_seq_len=96, max_batch_size=2, model_parallel_size=1)
    texts = llama.text_completion(PROMPTS, temperature=0, max_gen_len=40, logprobs=True)
    full = sum(p.numel() * p.element_size() for p in llama.model.parameters())
    return {"tokens": [t["tokens"] for t in texts], "bytes": full, "cache_heads": llama.cache.k.shape[2]}


def most_bytes(name: str, whole: int, n: int) -> float:
    """The weights one of n processes may hold: 1/n, plus the norms (whole on each: 0.3% here), plus what a layout
    repeats. stories260K ties its head to the embedding, but a Llama 2-style Meta checkpoint splits the two
    differently (width, vocabulary), so each process holds 1/n of both; with one key/value head, each holds all
    of k_proj and v_proj (5 layers x 2 x 8 x 64 floats)."""
    repeated = {"llama2": 512 * 64 * 4 / n, "mqa": 5 * 2 * 8 * 64 * 4 * (1 - 1 / n)}.get(name, 0)
    return (whole / n + repeated) * 1.01


def run_workers(tmp_path: Path, nproc: int, tok: Path, ckpts: list[Path]) -> list[dict]:
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(nproc, tmp_path / "worker.py", tok, tmp_path, json.dumps(PROMPTS), *ckpts)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_processes_generate_the_same_tokens_holding_half_the_weights(checkpoints, tmp_path, one_thread):
    names = ["llama2", "llama3", "mqa"]
    ranks = run_workers(tmp_path, 2, checkpoints["tok"], [checkpoints[n] for n in names])
    for name in names:
        ref = one_process(checkpoints[name], checkpoints["tok"])
        assert all(len(t) == 40 for t in ref["tokens"])
        for rank, results in enumerate(ranks):
            got = results[str(checkpoints[name])]
            assert got["tokens"] == ref["tokens"], (name, rank)
            assert got["bytes"] <= most_bytes(name, ref["bytes"], 2), (name, got["bytes"] / ref["bytes"])
            if name != "mqa":  # a 2-shard Meta checkpoint: each process opens only its own file
                assert got["files"] == [f"consolidated.{rank:02d}.pth"], (name, rank, got["files"])
                assert got["cache_heads"] * 2 == ref["cache_heads"]
    # MQA on 2 processes: the one key/value head is repeated, each process caches its copy.
    assert ranks[0][str(checkpoints["mqa"])]["cache_heads"] == 1


def test_four_processes_slice_a_two_shard_checkpoint_and_repeat_kv_heads(checkpoints, tmp_path, one_thread):
    """4 processes on 2 Meta shards: each takes its quarter of the merged pieces; the MQA model's one key/value head
    is repeated for 4 processes."""
    names = ["llama2", "mqa"]
    ranks = run_workers(tmp_path, 4, checkpoints["tok"], [checkpoints[n] for n in names])
    for name in names:
        ref = one_process(checkpoints[name], checkpoints["tok"])
        for results in ranks:
            got = results[str(checkpoints[name])]
            assert got["tokens"] == ref["tokens"], name
            assert got["bytes"] <= most_bytes(name, ref["bytes"], 4), (name, got["bytes"] / ref["bytes"])
            assert got["cache_heads"] == 1


def test_generate_with_tp_under_torchrun(checkpoints, tmp_path, capsys, one_thread):
    ckpt, tok = checkpoints["llama3"], checkpoints["tok"]
    args = ["generate", "--checkpoint", ckpt, "--tokenizer", tok, "--temperature", "0", "--max-new-tokens", "30"]
    assert main([str(a) for a in args] + ["Once upon a time"]) == 0
    alone = capsys.readouterr().out
    two = torchrun(2, "-m", "llamakit", *args, "--tp", "2", "Once upon a time")
    assert two.stdout == alone  # printed once, by the first process


@pytest.mark.slow
def test_chat_with_tp_under_torchrun(checkpoints):
    """The first process reads each line and hands it to the others; the session equals one process's."""
    ckpt, tok = checkpoints["llama3"], checkpoints["tok"]
    chat = ["chat", "--checkpoint", ckpt, "--tokenizer", tok, "--temperature", "0", "--max-new-tokens", "12",
            "--chat-format", "alpaca"]
    lines = "Hello there\n/reset\nTell me a story\n"
    one = subprocess.run([sys.executable, "-m", "llamakit", *map(str, chat)], input=lines, cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert torchrun(2, "-m", "llamakit", *chat, "--tp", "2", stdin=lines).stdout == one.stdout


def test_tp_needs_as_many_torchrun_processes(checkpoints, capsys):
    args = ["generate", "--checkpoint", str(checkpoints["mqa"]), "--tp", "2", "hi"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == ("llamakit generate: error: --tp 2 splits the model over 2 processes, but this job has 1; run it "
                   "as torchrun --nproc_per_node 2 -m llamakit generate ...\n")
