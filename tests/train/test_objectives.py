"""A new method is a new objective plus a data adapter: a DPO-shaped objective with a frozen reference on the loop."""

import copy
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from llamakit.model import ModelConfig, Transformer
from llamakit.train.config import RunConfig
from llamakit.train.runner import Job, loop_data, parallelize, run

VOCAB, SEQ_LEN = 64, 8


@dataclass
class PairData:
    seq_len: int = SEQ_LEN
    pairs: int = 32


@dataclass
class Preference:
    beta: float = 0.5


@dataclass
class PairConfig(RunConfig):
    """A new method's config: only what it adds to the shared sections."""

    command: ClassVar[str] = "pairs"
    data: PairData = field(default_factory=PairData)
    preference: Preference = field(default_factory=Preference)


class Pairs:
    """Preference pairs whose chosen sequences use the low half of the vocabulary and rejected ones the high half."""

    def __init__(self, num_samples: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.num_samples = num_samples
        self.chosen = torch.randint(0, VOCAB // 2, (num_samples, SEQ_LEN), generator=g)
        self.rejected = torch.randint(VOCAB // 2, VOCAB, (num_samples, SEQ_LEN), generator=g)

    def batch(self, indices):
        return {"chosen": self.chosen[list(indices)], "rejected": self.rejected[list(indices)]}  # (B, T) each


class PairPreference:
    """DPO's shape (Rafailov et al., 2023): -log sigmoid(beta * (policy margin - reference margin)), per pair."""

    def __init__(self, reference: torch.nn.Module, beta: float):
        self.reference, self.beta = reference, beta

    def loss(self, model, batch):
        policy = _logp(model, batch["chosen"]) - _logp(model, batch["rejected"])  # (B,)
        with torch.no_grad():
            reference = _logp(self.reference, batch["chosen"]) - _logp(self.reference, batch["rejected"])  # (B,)
        margin = self.beta * (policy - reference)  # (B,)
        return -F.logsigmoid(margin).sum(), {"reward_margin": margin.detach().sum()}

    def weight(self, batch):
        return len(batch["chosen"])  # pairs

    def tokens(self, batch):
        return batch["chosen"].numel() + batch["rejected"].numel()  # both sequences of every pair


def _logp(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sequence after its first token: (B,)."""
    logits = model(ids[:, :-1]).float()  # (B, T - 1, V)
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)  # (B,)


def test_a_preference_objective_with_a_frozen_reference_runs_on_the_loop(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=16,
                                        max_seq_len=SEQ_LEN))
    policy = copy.deepcopy(reference)  # starts as the reference: the first margins are exactly 0
    reference_before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    placed = {}

    def spy(model, cfg, procs):  # the real parallelize, recording what it placed and on which device
        placed[id(model)] = procs.device
        return parallelize(model, cfg, procs)

    monkeypatch.setattr("llamakit.train.runner.parallelize", spy)
    cfg = PairConfig()
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.device = 6, 8, 4, "cpu"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 0
    cfg.eval.every, cfg.eval.batches, cfg.checkpoint.every = 3, 1, 0
    cfg.checkpoint.out_dir = str(tmp_path / "run")
    cfg.log.tensorboard, cfg.log.plot, cfg.log.peak_tflops = False, False, 1.0

    def build_job(cfg: PairConfig, procs) -> Job:
        data = loop_data(cfg, Pairs(cfg.data.pairs, 0), Pairs(8, 1), procs)
        objective = PairPreference(reference, cfg.preference.beta)
        return Job(policy.train(), objective, data, None, 1e6, aux={"reference": reference.train()})

    final = run(cfg, build_job)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0]["reward_margin"] == 0 and steps[0]["loss"] == pytest.approx(math.log(2))  # policy = reference
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["loss"] < math.log(2)  # it learns to prefer chosen
    assert [r["step"] for r in records if "val_reward_margin" in r] == [0, 3, 6]
    with torch.no_grad():  # the last validation: the metric's sum over its 4 pairs / 4 pairs
        _, own = PairPreference(reference, cfg.preference.beta).loss(policy.eval(), Pairs(8, 1).batch(range(4)))
    assert records[-1]["val_reward_margin"] == pytest.approx(float(own["reward_margin"]) / 4, rel=1e-6)
    tokens_per_step = 8 * 2 * SEQ_LEN  # tokens of both sequences of 8 pairs, not the 8 pairs
    assert [r["tokens_seen"] for r in steps] == [tokens_per_step * s for s in range(1, 7)]
    # MFU from tokens too: tokens/s x 1e6 FLOPs per token (the Job's) / the 1 TFLOP/s peak (log.peak_tflops)
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 1e-6) for r in steps)

    device = placed[id(reference)]
    assert id(policy) in placed and all(p.device == device for p in reference.parameters())
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(v, reference_before[k]) for k, v in reference.state_dict().items())  # never updated
    assert any(not torch.equal(v, policy_before[k]) for k, v in policy.state_dict().items())
    optimizer = torch.load(final.parent / "step-6" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(list(policy.parameters()))  # AdamW moments for the policy alone
