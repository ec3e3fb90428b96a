"""Choosing the next token: pure functions on logits, plus the settings that select them.

All functions take logits (B, V) and return logits or ids; filtered-out tokens get -inf so the
same tensor can go on to the next filter. The order follows common practice (and Hugging Face's):
repetition penalty, temperature, top-k, top-p, min-p, then sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from llamakit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; 1.0 / top_p 1.0 / top_k 0 / min_p 0 disable a filter."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value, kind = getattr(self, name), Integral if name == "top_k" else Real
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                what = "an integer" if kind is Integral else "a finite number"
                raise ConfigError(f"bad sampling setting {name}={value!r}: {name} must be {what}")
        checks = {
            "temperature": (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            "top_p": (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 disables nucleus sampling)"),
            "top_k": (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            "min_p": (0 <= self.min_p < 1, "min_p must be in [0, 1) (0 disables it)"),
            "repetition_penalty": (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 disables it)"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ConfigError(f"bad sampling setting {name}={getattr(self, name)!r}: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make every token already in the row less likely.

    seen is a boolean (B, V) mask of tokens in the prompt or output; a positive logit is divided by
    the penalty and a negative one multiplied, so the token always loses probability.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most likely tokens of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference: keep the most likely tokens until their mass reaches p.

    A token is dropped when the mass of the tokens strictly more likely than it already exceeds p,
    so the most likely token always survives.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop_sorted = mass_before > p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id (B,) for each row of logits (B, V)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    # Shifted so the best logit is 0 first: a tiny temperature then gives -inf for the others, not inf - inf =
    # nan; one below the float's range divides by 0, so the best stays 0 rather than 0 / 0 = nan.
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(logits == 0, 0.0, logits / params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p exactly, like
    # torch.multinomial, but without the device-to-host sync multinomial needs on CUDA.
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's raw distribution (before any sampling filter), as Meta reports."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
