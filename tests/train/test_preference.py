"""DPO's losses against their closed forms, and the objective on a tiny model."""

import math

import pytest
import torch

from llamakit.errors import ConfigError
from llamakit.model import ModelConfig, Transformer
from llamakit.train.batches import IGNORE_INDEX
from llamakit.train.preference import DPOConfig, DPOObjective, dpo_losses, sequence_logprobs


def _losses(loss="sigmoid", beta=0.1, label_smoothing=0.0):
    cfg = DPOConfig(beta=beta, loss=loss, label_smoothing=label_smoothing)
    # h = (-3 - -4) - (-5 - -4) = 2
    return dpo_losses(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), cfg)


def test_the_losses_equal_their_closed_forms():
    assert _losses().item() == pytest.approx(math.log1p(math.exp(-0.2)))  # -log sigmoid(beta h)
    conservative = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert _losses(label_smoothing=0.1).item() == pytest.approx(conservative)
    assert _losses("ipo").item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)


@pytest.mark.parametrize("cfg, expected", [(DPOConfig(), math.log(2)), (DPOConfig(label_smoothing=0.2), math.log(2)),
                                           (DPOConfig(loss="ipo", beta=0.5), 1.0)])
def test_a_policy_equal_to_its_reference_gives_the_starting_loss(cfg, expected):
    logps = torch.randn(6)
    assert torch.allclose(dpo_losses(logps[:3], logps[3:], logps[:3], logps[3:], cfg), torch.full((3,), expected))


@pytest.mark.parametrize("bad", [dict(loss="kto"), dict(beta=0), dict(label_smoothing=0.5),
                                 dict(loss="ipo", label_smoothing=0.1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="dpo"):
        DPOConfig(**bad)


@pytest.fixture(scope="module")
def pairs():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16))
    ids = torch.randint(0, 64, (4, 10))  # 2 pairs: rows 0-1 chosen, rows 2-3 rejected
    labels = ids[:, 1:].clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[1, 7:] = IGNORE_INDEX  # a shorter answer: padding
    return model, {"input_ids": ids[:, :-1], "labels": labels}


def test_sequence_logprobs_sum_the_answer_tokens_only(pairs):
    model, batch = pairs
    with torch.no_grad():
        logits = model(batch["input_ids"])
    sums, counts = sequence_logprobs(logits, batch["labels"])
    assert counts.tolist() == [5, 3, 5, 5]
    by_hand = sum(logits[1, t].log_softmax(-1)[batch["labels"][1, t]] for t in range(4, 7))
    assert sums[1].item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_the_objective_starts_at_ln2_and_reports_rewards(pairs):
    model, batch = pairs
    with torch.no_grad():
        ref, counts = sequence_logprobs(model(batch["input_ids"]), batch["labels"])
    batch = {**batch, "ref_logps": ref}
    objective = DPOObjective(DPOConfig(beta=0.1, nll_weight=0.2))
    total, metrics = objective.loss(model, batch)
    assert objective.weight(batch) == 2 and objective.tokens(batch) == 4 * 9
    nll = -(ref[:2] / counts[:2]).sum()
    assert total.item() == pytest.approx(2 * math.log(2) + 0.2 * nll.item(), abs=1e-5)
    assert metrics["reward_margin"] == 0 and metrics["reward_accuracy"] == 0
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
