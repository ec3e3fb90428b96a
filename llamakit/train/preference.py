"""Direct preference optimisation as an objective on the one loop: DPO (Rafailov et al., 2023), its conservative
variant (label smoothing ε, Mitchell 2023), IPO (Azar et al., 2023), and Llama 3's NLL term on the chosen answer.

With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)], per pair:
- sigmoid: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)   (ε = 0 is DPO; at π = π_ref the loss is ln 2)
- ipo:     (h − 1/(2β))², with each log-probability averaged over its response's tokens (as trl does; IPO's paper
           states it for whole sequences, implementations differ: here the length-normalised form).
Llama 3 adds nll_weight × the chosen response's mean token NLL (0.2 in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamakit.errors import ConfigError
from llamakit.train.batches import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    """The preference loss and its strength."""

    beta: float = 0.1  # Llama 3's value
    loss: str = "sigmoid"  # sigmoid (DPO, conservative DPO with label_smoothing) or ipo
    label_smoothing: float = 0.0  # conservative DPO's ε: the chance a preference label is flipped
    nll_weight: float = 0.0  # Llama 3: 0.2

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("dpo.label_smoothing applies to the sigmoid loss only; set it to 0 for ipo")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labelled tokens (B,), and how many there are (B,).

    logits (B, T, V) predict labels (B, T), already shifted (labels[t] is the token after input t);
    IGNORE_INDEX marks the prompt and the padding.
    """
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0)
    token_logps = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               cfg: DPOConfig) -> torch.Tensor:
    """Per-pair losses (P,) from the policy's and the reference's log-probabilities of each answer (P,)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)  # (P,)
    if cfg.loss == "ipo":
        return (h - 1 / (2 * cfg.beta)) ** 2
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)


class DPOObjective:
    """DPO on batches of P pairs: input_ids and labels (2P, T), the P chosen rows first, then the P rejected ones
    (one forward for both), and ref_logps (2P,): the reference's log-probabilities, computed once beforehand."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, counts = sequence_logprobs(model(batch["input_ids"]), batch["labels"])  # (2P,) each
        ref = batch["ref_logps"].to(logps.dtype)
        if self.cfg.loss == "ipo":  # length-normalised log-probabilities (module docstring)
            logps, ref = logps / counts, ref / counts
        P = logps.size(0) // 2
        losses = dpo_losses(logps[:P], logps[P:], ref[:P], ref[P:], self.cfg)  # (P,)
        reward_chosen = self.cfg.beta * (logps[:P] - ref[:P]).detach()  # DPO's implicit rewards (P,)
        reward_rejected = self.cfg.beta * (logps[P:] - ref[P:]).detach()
        metrics = {"reward_chosen": reward_chosen.sum(), "reward_rejected": reward_rejected.sum(),
                   "reward_margin": (reward_chosen - reward_rejected).sum(),
                   "reward_accuracy": (reward_chosen > reward_rejected).float().sum()}
        total = losses.sum()
        if self.cfg.nll_weight:
            nll = -(logps[:P] if self.cfg.loss == "ipo" else logps[:P] / counts[:P])  # mean token NLL (P,)
            metrics["nll_chosen"] = nll.detach().sum()
            total = total + self.cfg.nll_weight * nll.sum()
        return total, metrics

    def weight(self, batch: Batch) -> int:
        """Pairs: the loss and every metric are per-pair averages."""
        return batch["input_ids"].size(0) // 2

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()


REWARD_LOSSES = ("log_sig", "log_exp")


@dataclass
class RewardConfig:
    """The pairwise ranking loss of a reward model."""

    loss: str = "log_sig"  # log_sig: -log σ(r_c − r_r − m); log_exp: log(1 + exp(r_r − r_c + m)) (ColossalChat's)
    use_margins: bool = True  # m from the data (Llama 2); False: m = 0 (Llama 3)
    center: float = 0.0  # + center × (r_c + r_r)²: keeps rewards near 0 (trl's center_rewards_coefficient)

    def __post_init__(self):
        if self.loss not in REWARD_LOSSES:
            raise ConfigError(f"reward.loss={self.loss!r}; choose one of {', '.join(REWARD_LOSSES)}")
        if self.center < 0:
            raise ConfigError(f"reward.center={self.center} must be >= 0")


def ranking_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, cfg: RewardConfig
                   ) -> torch.Tensor:
    """Per-pair losses (P,) from the scores of the chosen and the rejected answers (P,) and the margins (P,)."""
    diff = chosen - rejected - (margin if cfg.use_margins else 0.0)  # (P,)
    # The same function in two forms: ColossalChat's log_exp spells it out, log_sig is the stable one.
    losses = -F.logsigmoid(diff) if cfg.loss == "log_sig" else torch.log1p(torch.exp(-diff))
    return losses + cfg.center * (chosen + rejected) ** 2


class RewardObjective:
    """Reward modelling on batches of P pairs: input_ids (2P, T) whole sequences, chosen rows first, right-padded;
    last (2P,) each row's last real position; margin (P,)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = model(batch["input_ids"], logits_at=batch["last"])[:, 0, 0]  # (2P,)
        P = r.size(0) // 2
        chosen, rejected = r[:P], r[P:]
        losses = ranking_losses(chosen, rejected, batch["margin"].to(r.dtype), self.cfg)
        gap = (chosen - rejected).detach()
        return losses.sum(), {"accuracy": (gap > 0).float().sum(), "margin": gap.sum(),
                              "reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum()}

    def weight(self, batch: Batch) -> int:
        return batch["input_ids"].size(0) // 2

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()
