"""Pipeline parallelism: the stage split chained equals the model; PP=2, PP x DP = 2 x 2 and PP x TP = 2 x 2 torchrun
runs give the losses, weights and optimizer state of one process; a run saved on one layout resumes exactly on
another."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llamakit import ModelConfig, Transformer
from llamakit.errors import ConfigError
from llamakit.runtime import Processes
from llamakit.train.config import TrainSection
from llamakit.train.objectives import NextTokenLoss, packed_mask
from llamakit.train.pipeline import Stage, _stack, check_pipeline, split_stage, stage_layers
from llamakit.train.preference import RewardConfig, RewardObjective
from tests.train.test_pretrain import ENV, SMALL, TINY, _losses, prepared  # noqa: F401 (prepared: a fixture)

CONFIG = ModelConfig(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)
# SMALL with 3 layers, so PP=2 splits them unevenly (layers 0-1, then 2); 4 micro-batches of 2 per step.
ARGS = [*SMALL, "--model.n_layers", "3", "--train.max_steps", "10", "--eval.every", "5", "--checkpoint.every", "5",
        "--checkpoint.keep_last", "3"]
STEPS = range(1, 11)


def _procs(pp: int, pp_rank: int = 0, dp: int = 1) -> Processes:
    return Processes(rank=pp_rank * dp, world_size=pp * dp, local_rank=0, device=torch.device("cpu"), pp=pp)


def test_layers_split_into_contiguous_balanced_stages():
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # Left over layers go to the middle stages first (the ends also hold the embedding and the head), then the first.
    assert stage_layers(6, 4) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert stage_layers(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


@pytest.mark.parametrize("packed", [False, True])
def test_stages_chained_give_the_models_logits(packed):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    mask = packed_mask(segments) if packed else None
    expected = model(tokens, mask=mask)
    ranges = stage_layers(CONFIG.n_layers, 3)
    stages = [Stage(model, r, first=i == 0, last=i == 2) for i, r in enumerate(ranges)]
    h = tokens
    for stage in stages:
        h = stage(h, mask=mask)
    torch.testing.assert_close(h, expected, rtol=0, atol=0)  # the same modules, the same operations
    # Names keep the global layer index: together the stages hold the model's state dict, each name once.
    names = [name for stage in stages for name in stage.state_dict()]
    assert names == list(model.state_dict())
    assert sorted(stages[1].layers) == ["2", "3"] and stages[1].embed_tokens is None and stages[1].lm_head is None


def test_micro_batches_of_different_lengths_stack_without_changing_their_loss():
    """SFT pads each micro-batch to its own longest row; the pipeline pads them all to the step's longest, which
    (padding ignored by the loss, attention causal) must leave the summed loss as it was."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    loss = NextTokenLoss()
    micro = []
    for T, seed in ((5, 1), (9, 2)):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, CONFIG.vocab_size, (2, T), generator=g)
        labels = torch.randint(0, CONFIG.vocab_size, (2, T), generator=g)
        labels[0, :2] = -100  # a prompt
        segments = torch.tensor([[0] * (T - 2) + [1] * 2, [0] * T])
        micro.append({"input_ids": ids, "labels": labels, "segment_ids": segments})
    expected = sum(loss.loss(model, b)[0] for b in micro)
    batch = _stack(micro, "cpu")
    assert batch["input_ids"].shape == (4, 9) and (batch["labels"][:2, 5:] == -100).all()
    whole = Stage(model, range(CONFIG.n_layers), first=True, last=True)
    logits = whole(batch["input_ids"], mask=packed_mask(batch["segment_ids"]))  # (4, 9, vocab)
    got = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_a_stage_keeps_rotary_frequencies_in_fp32_when_cast():
    model = Transformer(CONFIG)
    stage = split_stage(model, _procs(pp=2, pp_rank=1)).to(torch.bfloat16)
    assert stage.inv_freq.dtype == torch.float32
    torch.testing.assert_close(stage.inv_freq, model.inv_freq)


def test_what_the_pipeline_cannot_run_is_refused_naming_the_fix():
    pp2 = _procs(pp=2)
    cases = [
        (TrainSection(batch_size=2, micro_batch_size=2), NextTokenLoss(), "set train.pipeline_schedule to gpipe"),
        (TrainSection(batch_size=8, micro_batch_size=2), RewardObjective(RewardConfig()), "not RewardObjective"),
        (TrainSection(batch_size=8, micro_batch_size=2, precision="fp16"), NextTokenLoss(), "use bf16 or fp32"),
    ]
    for cfg, objective, fix in cases:
        with pytest.raises(ConfigError, match=fix) as raised:
            check_pipeline(cfg, pp2, objective)
        assert "train.pipeline" in str(raised.value)
    check_pipeline(TrainSection(batch_size=2, micro_batch_size=2, pipeline_schedule="gpipe"), pp2, NextTokenLoss())
    with pytest.raises(ConfigError, match="different stages"):
        split_stage(Transformer(CONFIG.replace(tie_word_embeddings=True)), pp2)
    with pytest.raises(ConfigError, match="at least one layer per stage"):
        split_stage(Transformer(CONFIG), _procs(pp=6))


def _train(out: Path, nproc: int, *args: str, port: int = 0) -> None:
    """A pretraining run of ARGS (plus args) on nproc processes (torchrun with gloo on CPU when more than one)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    command = [*launcher, "-m", "llamakit", "pretrain", str(TINY), *ARGS, "--checkpoint.out_dir", str(out), *args]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:  # noqa: F811
    """The one-process run every layout must reproduce."""
    out = tmp_path_factory.mktemp("pipeline") / "one"
    _train(out, 1, "--data.path", str(prepared))
    return out


def _assert_same_run(run: Path, reference: Path, steps=STEPS) -> None:
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = _losses(reference, key), _losses(run, key)
        assert [s for s in a if s in steps] == [s for s in b if s in steps], key
        assert all(abs(a[s] - b[s]) < 1e-5 * max(1, abs(a[s])) for s in b if s in steps), (key, a, b)
    ours, theirs = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5)


def _assert_same_optimizer_state(run: Path, reference: Path, step: int) -> None:
    ours = torch.load(run / f"step-{step}" / "optimizer.pt", weights_only=True)
    theirs = torch.load(reference / f"step-{step}" / "optimizer.pt", weights_only=True)
    assert ours["param_groups"] == theirs["param_groups"]  # every parameter, by name, in the model's order
    assert list(ours["state"]) == list(theirs["state"])
    for name, state in theirs["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][name][key], value, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def two_stages(prepared, tmp_path_factory) -> Path:  # noqa: F811
    """The same run on two pipeline stages (1F1B)."""
    out = tmp_path_factory.mktemp("pipeline") / "pp2"
    _train(out, 2, "--data.path", str(prepared), "--train.pipeline_parallel", "2", port=29561)
    return out


def test_two_stages_train_as_one_process(two_stages, reference):
    _assert_same_run(two_stages, reference)
    for step in (5, 10):  # full weights and optimizer state under the model's names, as one process writes them
        _assert_same_optimizer_state(two_stages, reference, step)
    assert (two_stages / "step-5" / "config.json").read_text() == (reference / "step-5" / "config.json").read_text()


def test_two_stages_times_two_replicas_with_gpipe_train_as_one_process(prepared, reference, tmp_path):  # noqa: F811
    run = tmp_path / "pp2xdp2"
    _train(run, 4, "--data.path", str(prepared), "--train.pipeline_parallel", "2", "--train.pipeline_schedule",
           "gpipe", port=29562)
    _assert_same_run(run, reference)
    _assert_same_optimizer_state(run, reference, 10)


def test_two_stages_times_two_tensor_parallel_ranks_train_as_one_process(prepared, reference, tmp_path):  # noqa: F811
    # Sequence parallel between blocks, so each tp rank passes its slice of the sequence to the next stage.
    run = tmp_path / "pp2xtp2"
    _train(run, 4, "--data.path", str(prepared), "--train.pipeline_parallel", "2", "--train.tensor_parallel", "2",
           port=29564)
    _assert_same_run(run, reference)
    _assert_same_optimizer_state(run, reference, 10)


def _continue(source: Path, out: Path, nproc: int, *args: str, port: int = 0) -> None:
    """Resume source's step-5 checkpoint in a fresh run folder out, on nproc processes with args' layout."""
    out.mkdir()
    shutil.copytree(source / "step-5", out / "step-5")
    _train(out, nproc, *args, "--resume", port=port)


def test_a_checkpoint_resumes_exactly_on_another_layout(prepared, reference, two_stages, tmp_path):  # noqa: F811
    # The two stages' step-5 on one process (which loads the whole model)...
    single = tmp_path / "single"
    _continue(two_stages, single, 1, "--data.path", str(prepared))
    _assert_same_run(single, reference, steps=range(6, 11))
    # ...and one process's step-5 on two stages (each loads its part) continue the uninterrupted run.
    staged = tmp_path / "staged"
    _continue(reference, staged, 2, "--data.path", str(prepared), "--train.pipeline_parallel", "2", port=29563)
    _assert_same_run(staged, reference, steps=range(6, 11))
