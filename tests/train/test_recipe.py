"""The optimizer recipe, the schedule, the config files and the batch order, each against its written rule."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llamakit.errors import ConfigError, DataError
from llamakit.model import ModelConfig, Transformer
from llamakit.train.batches import EpochOrder, PackedWindows, StepBatches, eval_batches
from llamakit.train.config import OptimSection, TrainSection, accumulation_steps, model_config, parse_config
from llamakit.train.optim import build_optimizer, lr_at, param_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def _schedule(warmup: int, steps: int, lr: float = 1.0) -> list[float]:
    """The learning rate of updates 1..steps (loop steps 0..steps-1)."""
    cfg = OptimSection(lr=lr, warmup_steps=warmup, min_lr_ratio=0.1)
    return [lr_at(s, cfg, steps) for s in range(steps)]


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    lrs = _schedule(2000, 10_000, lr=3e-4)
    assert lrs[0] == pytest.approx(3e-4 / 2000) and lrs[999] == pytest.approx(3e-4 * 1000 / 2000)
    assert lrs[1999] == pytest.approx(3e-4)  # update 2000 = W ends the warmup at the peak
    assert lrs[-1] == pytest.approx(3e-5)  # update N runs at 10% of the peak
    # halfway from update W to update N: halfway between peak and floor
    assert lrs[6000 - 1] == pytest.approx(3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("warmup, steps", [(2, 6), (1, 5), (0, 5), (20, 200)])
def test_schedule_is_one_curve_reaching_each_value_once(warmup, steps):
    lrs = _schedule(warmup, steps)
    peak = max(warmup, 1) - 1  # index of the update that gets the peak
    assert lrs[peak] == 1.0 and lrs.count(1.0) == 1  # no two updates share the peak
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # strictly up to the peak
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # strictly down after it
    assert lrs[-1] == pytest.approx(0.1)  # the last update gets the floor


def test_schedule_table_in_the_readme():
    assert [round(lr, 3) for lr in _schedule(2, 6)] == [0.5, 1.0, 0.868, 0.55, 0.232, 0.1]
    assert _schedule(5, 4) == [0.2, 0.4, 0.6, 0.8]  # warmup_steps >= max_steps: only the warmup


def test_weight_decay_skips_norms_and_the_optimizer_holds_the_recipe():
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "layernorm" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    model.layers[0].mlp.requires_grad_(False)  # frozen parameters get no optimizer state
    opt = build_optimizer(model, OptimSection())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not held & {id(p) for p in model.layers[0].mlp.parameters()}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads(name):
    cfg = parse_config(CONFIGS / f"{name}.yaml")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.min_lr_ratio == 0.1
    config = model_config(cfg.model, vocab_size=512, seq_len=cfg.data.seq_len)
    assert config.max_seq_len >= cfg.data.seq_len


def test_published_recipes_match_the_papers():
    l2 = parse_config(CONFIGS / "llama2-7b.yaml")
    assert (l2.optim.lr, l2.optim.warmup_steps, l2.data.seq_len) == (3e-4, 2000, 4096)
    assert l2.train.batch_size * l2.data.seq_len == 4 * 2**20  # 4M tokens per step
    assert model_config(l2.model, 32000, 4096) == ModelConfig.from_preset("llama2-7b")
    l3 = parse_config(CONFIGS / "llama3-8b.yaml")
    assert l3.data.seq_len == 8192 and model_config(l3.model, 128256, 8192) == ModelConfig.from_preset("llama3-8b")


def test_overrides_and_unknown_keys(tmp_path):
    cfg = parse_config(CONFIGS / "tiny.yaml", ["--optim.lr", "1e-4", "--train.max_steps", "7"])
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="lrr"):
        parse_config(CONFIGS / "tiny.yaml", ["--optim.lrr", "1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="optim.lr.*fast"):
        parse_config(CONFIGS / "tiny.yaml", ["--optim.lr", "fast"])
    with pytest.raises(ConfigError, match="no such config"):
        parse_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        parse_config(CONFIGS / "tiny.yaml", ["--train.batch_size", "12"])
    with pytest.raises(ConfigError, match="processes"):
        accumulation_steps(TrainSection(batch_size=16, micro_batch_size=8), world_size=3)


class Stream:
    """A token stream whose window contents are checkable: token i has value i."""

    def __init__(self, n):
        self.tokens = np.arange(n, dtype=np.int64)

    def __len__(self):
        return len(self.tokens)

    def window(self, start, length):
        return self.tokens[start:start + length]


def test_windows_cover_the_stream_once_per_epoch_in_a_seeded_order():
    windows = PackedWindows(Stream(16 * 10 + 1), seq_len=16)
    order = EpochOrder(windows.num_samples, seed=3)
    first = [order(i) for i in range(10)]
    second = [order(i) for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert first == [EpochOrder(10, seed=3)(i) for i in range(10)]
    batch = windows.batch([2])
    assert batch["input_ids"].tolist() == [list(range(32, 48))] and batch["labels"].tolist() == [list(range(33, 49))]
    with pytest.raises(DataError, match="seq_len"):
        PackedWindows(Stream(16), seq_len=16)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_step_holds_the_same_samples_whatever_the_process_count(world_size):
    windows = PackedWindows(Stream(64 * 40 + 1), seq_len=64)
    reference = torch.cat([b["input_ids"] for b in StepBatches(windows, 8, 2).train_step(5)])
    parts = [StepBatches(windows, 8, 2, rank, world_size).train_step(5) for rank in range(world_size)]
    assert all(len(p) == 8 // world_size // 2 for p in parts)
    assert torch.equal(torch.cat([b["input_ids"] for p in parts for b in p]), reference)
    val = [eval_batches(windows, 3, 2, rank, world_size) for rank in range(world_size)]
    seen = sorted(int(row[0]) // 64 for part in val for b in part for row in b["input_ids"])
    assert seen == list(range(6 - 6 % world_size))  # the first samples, as many on every process
    assert len({sum(len(b["input_ids"]) for b in part) for part in val}) == 1
    with pytest.raises(DataError, match="fewer than the 8 processes"):
        eval_batches(PackedWindows(Stream(64 * 5 + 1), seq_len=64), 3, 2, 0, 8)
    with pytest.raises(DataError, match="eval.batches=1 micro-batches of 2 give fewer validation samples than the 4 "
                                        "data-parallel processes; raise eval.batches to at least 2"):
        eval_batches(windows, 1, 2, 0, 4)  # 40 samples, but only 2 of them asked for


def test_alignment_presets_load_and_match_the_papers():
    from llamakit.train.dpo import DPORunConfig
    from llamakit.train.ppo import PPORunConfig
    from llamakit.train.reward import RewardRunConfig

    root = CONFIGS.parent
    rm = parse_config(root / "reward" / "llama2-7b-reward.yaml", kind=RewardRunConfig)  # Llama 2 §3.2.2
    assert (rm.optim.lr, rm.train.batch_size, rm.optim.min_lr_ratio, rm.reward.use_margins) == (1e-5, 512, 0.1, True)
    dpo = parse_config(root / "dpo" / "llama3-8b-dpo.yaml", kind=DPORunConfig)  # Llama 3 §4.1.4
    assert (dpo.dpo.beta, dpo.optim.lr, dpo.dpo.nll_weight, dpo.data.mask_end) == (0.1, 1e-5, 0.2, True)
    ppo = parse_config(root / "ppo" / "llama2-7b-ppo.yaml", kind=PPORunConfig)  # Llama 2 §3.2.3
    p = ppo.ppo
    assert (p.kl_coef, p.clip, p.safety_threshold, p.whiten_scores, p.rollout_batch_size) == (0.01, 0.2, 0.15, True, 512)
    assert (ppo.train.batch_size, ppo.optim.betas, ppo.optim.weight_decay, ppo.optim.grad_clip) == (64, (0.9, 0.95),
                                                                                                     0.1, 1.0)
    for tiny, kind, extra in (("dpo/tiny-dpo", DPORunConfig, []), ("reward/tiny-reward", RewardRunConfig, []),
                              ("reward/tiny-reward-lora", RewardRunConfig, []),
                              ("ppo/tiny-ppo", PPORunConfig, ["--ppo.reward_function", "my_rewards:score"])):
        assert parse_config(root / f"{tiny}.yaml", extra, kind).train.max_steps <= 60


def test_a_metrics_file_cut_short_by_a_kill_still_reads(tmp_path):
    """kill -9 mid-write leaves a partial last line: resume and `scaling fit` drop it; damage elsewhere is an error."""
    from llamakit.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 6.2}\n{"step": 2, "loss": 6.1}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 6.2}, {"step": 2, "loss": 6.1}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 6.1}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:1: not valid JSON"):
        read_metrics(path)
