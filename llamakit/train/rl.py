"""PPO's pieces as pure functions, and PPO as an objective on the one loop (Schulman et al., 2017; the RLHF form of
Ziegler et al., 2019 / InstructGPT, as in Llama 2 §3.2.3 and ColossalChat).

Per response token t (a row's response tokens in order, then padding):
- KL to the frozen reference: k1 = log π − log π_ref, or k3 = π_ref/π − 1 − log(π_ref/π) (Schulman's unbiased,
  non-negative estimator);
- reward r_t = −β·kl_t, plus the sequence's score at its last token;
- GAE (Schulman et al., 2016): δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, returns A_t + V_t;
- advantages whitened over every response token of the rollout batch;
- clipped policy loss max(−A·ρ, −A·clip(ρ, 1 ± ε)), ρ = π/π_old; clipped value loss
  ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²).
"""

from __future__ import annotations

import torch
from torch import nn

from llamakit.train.batches import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from the sampled tokens' log-probabilities under each."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # π_ref/π − 1 − log(π_ref/π) >= 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as trl); padding becomes 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, L) from per-token rewards and values (B, L); mask marks each row's tokens
    (contiguous, padding after them). The value after a row's last token is 0: the episode ends there."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses, and where clipping bit (1.0) or not (0.0)."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value losses, and where clipping bit."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each label under logits / temperature (B, T) (0 where IGNORE_INDEX), and each position's entropy."""
    logps_all = (logits.float() / temperature).log_softmax(-1)  # (B, T, V)
    targets = labels.masked_fill(labels == IGNORE_INDEX, 0)
    logps = logps_all.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    entropy = -(logps_all.exp() * logps_all).sum(-1)  # (B, T)
    return logps * (labels != IGNORE_INDEX), entropy


class ActorCritic(nn.Module):
    """The policy and the value model trained together (one optimizer, one data-parallel wrapper): a forward gives
    the policy's logits and the value of every position, and, given pretraining tokens, the policy's logits on
    them too (the ptx loss) in the same call."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def config(self):
        return self.policy.config

    @property
    def layers(self) -> list[nn.Module]:
        """Every transformer block, for activation checkpointing and compile."""
        return [*self.policy.layers, *self.value.layers]

    def checkpoint_parts(self) -> list[tuple[str, str, nn.Module]]:
        """(sub-folder, state-dict prefix, module) of what a checkpoint holds: the policy at the top (final/ holds
        only it), the value model in value/."""
        return [("", "policy.", self.policy), ("value", "value.", self.value)]

    def forward(self, tokens: torch.Tensor, ptx: torch.Tensor | None = None):
        logits = self.policy(tokens)  # (B, T, V)
        values = self.value(tokens)[..., 0].float()  # (B, T)
        return logits, values, (self.policy(ptx) if ptx is not None else None)


class PPOObjective:
    """PPO on minibatches of a rollout: input_ids, labels (B, T) (labels: the response tokens, IGNORE_INDEX
    elsewhere) and, at the same positions, old_logps, old_values, advantages, returns; optionally ptx_ids and
    ptx_labels (pretraining windows). The loop normalises by the response tokens."""

    def __init__(self, clip: float, value_clip: float, vf_coef: float, temperature: float = 1.0,
                 ptx_coef: float = 0.0):
        self.clip, self.value_clip, self.vf_coef = clip, value_clip, vf_coef
        self.temperature, self.ptx_coef = temperature, ptx_coef

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, values, ptx_logits = model(batch["input_ids"], batch.get("ptx_ids"))
        mask = (batch["labels"] != IGNORE_INDEX).float()
        logps, entropy = token_logprobs(logits, batch["labels"], self.temperature)
        pg, pg_clipped = policy_losses(logps, batch["old_logps"], batch["advantages"], self.clip)
        vf, vf_clipped = value_losses(values, batch["old_values"], batch["returns"], self.value_clip)
        pg_sum, vf_sum = (pg * mask).sum(), (vf * mask).sum()
        total = pg_sum + self.vf_coef * vf_sum
        approx_kl = 0.5 * (logps - batch["old_logps"]) ** 2  # to the rollout policy
        metrics = {"policy_loss": pg_sum.detach(), "value_loss": vf_sum.detach(),
                   "clip_fraction": (pg_clipped * mask).sum(), "value_clip_fraction": (vf_clipped * mask).sum(),
                   "entropy": (entropy.detach() * mask).sum(), "approx_kl": (approx_kl.detach() * mask).sum()}
        if ptx_logits is not None:
            ptx_logps, _ = token_logprobs(ptx_logits, batch["ptx_labels"])
            ptx_mask = batch["ptx_labels"] != IGNORE_INDEX
            # The mean pretraining NLL of this micro-batch, weighted like its response tokens (ColossalChat's
            # ptx_coef × ptx loss added to the policy loss).
            ptx = -ptx_logps.sum() / ptx_mask.sum().clamp(min=1) * mask.sum()
            metrics["ptx_loss"] = ptx.detach()
            total = total + self.ptx_coef * ptx
        return total, metrics

    def weight(self, batch: Batch) -> int:
        """Response tokens: the loss and its metrics are per-token means."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel() + (batch["ptx_ids"].numel() if "ptx_ids" in batch else 0)
