"""Choosing the next token: pure functions on logits, plus the settings that select them.

`probs(logits, params)` gives the distribution each row's next token is drawn from, and `draw` draws
it; `sample` is the two together. Settings are per row (`RowParams`, tensors of shape (B, 1)), so rows
with different temperatures, filters and seeds share one step. The filters take logits (B, V) and
return logits; filtered-out tokens get -inf so the same tensor can go on to the next filter. The order
follows common practice (and Hugging Face's): repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token is in the output
    seed: int | None = None  # the row's own random stream; None draws from the caller's generator

    def __post_init__(self):
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ConfigError(f"bad sampling setting seed={self.seed!r}: seed must be an integer (or None)")
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
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
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2] (0 disables it)"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2,
                                  "frequency_penalty must be in [-2, 2] (0 disables it)"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ConfigError(f"bad sampling setting {name}={getattr(self, name)!r}: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RowParams:
    """The sampling settings of a batch's rows as (B, 1) tensors; a filter no row uses is None (skipped)."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device | str = "cpu"):
        def column(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)[:, None]  # (B, 1)

        greedy = [p.greedy for p in params]
        self.all_greedy = all(greedy)
        self.greedy = column("greedy", torch.bool) if any(greedy) and not self.all_greedy else None
        # Greedy rows divide by 1 (their draw is replaced by the argmax), so no row divides by 0.
        self.temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)[:, None]
        self.top_k = column("top_k", torch.long) if any(p.top_k > 0 for p in params) else None
        self.top_k_max = max(p.top_k for p in params)
        self.top_p = column("top_p") if any(p.top_p < 1 for p in params) else None
        self.min_p = column("min_p") if any(p.min_p > 0 for p in params) else None
        self.repetition_penalty = (column("repetition_penalty")
                                   if any(p.repetition_penalty != 1 for p in params) else None)
        penalized = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.presence_penalty = column("presence_penalty") if penalized else None
        self.frequency_penalty = column("frequency_penalty") if penalized else None


def as_rows(params: SamplingParams | RowParams, logits: torch.Tensor) -> RowParams:
    return params if isinstance(params, RowParams) else RowParams([params] * logits.size(0), logits.device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
                             ) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make every token already in the row less likely.

    seen is a boolean (B, V) mask of tokens in the prompt or output; a positive logit is divided by
    the penalty and a negative one multiplied, so the token always loses probability.
    """
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep the k most likely tokens of each row (ties at the k-th value are kept); k <= 0 keeps all.

    k may be a (B, 1) tensor, one k per row; k_max, its largest value, saves reading it from the device.
    """
    V = logits.size(-1)
    if k_max is None:
        k_max = k if isinstance(k, int) else int(k.max())
    k_max = min(k_max, V)
    if k_max <= 0 or (isinstance(k, int) and k >= V):
        return logits
    k = torch.as_tensor(k, device=logits.device).expand(logits.size(0), 1)  # (B, 1)
    kth = torch.topk(logits, k_max, dim=-1).values.gather(-1, k.clamp(1, k_max) - 1)  # (B, 1)
    kth = torch.where((k > 0) & (k < V), kth, float("-inf"))  # k 0, or the whole vocabulary, keeps every token
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference: keep the most likely tokens until their mass reaches p.

    A token is dropped when the mass of the tokens strictly more likely than it already exceeds p,
    so the most likely token always survives; p 1 keeps every token.
    """
    if isinstance(p, float) and p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop_sorted = (mass_before > p) & (torch.as_tensor(p, device=logits.device) < 1)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if isinstance(min_p, float) and min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(logits: torch.Tensor, rows: RowParams, seen: torch.Tensor | None, counts: torch.Tensor | None
                    ) -> torch.Tensor:
    """CTRL's repetition penalty over `seen` (B, V), then OpenAI's presence and frequency penalties over the
    output's token `counts` (B, V): logit - frequency * count - presence * (count > 0)."""
    if seen is not None and rows.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
    if counts is not None and rows.presence_penalty is not None:
        logits = logits - rows.frequency_penalty * counts - rows.presence_penalty * (counts > 0)
    return logits


def probs(logits: torch.Tensor, params: SamplingParams | RowParams, seen: torch.Tensor | None = None,
          counts: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) each row's next token is drawn from; a greedy row's is one-hot at its argmax."""
    rows = as_rows(params, logits)
    logits = apply_penalties(logits, rows, seen, counts)
    if rows.all_greedy or rows.greedy is not None:
        best = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        one_hot = torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, best, 1.0)  # (B, V)
        if rows.all_greedy:
            return one_hot
    # Shifted so the best logit is 0 first: a tiny temperature then gives -inf for the others, not inf - inf =
    # nan; one below the float's range divides by 0, so the best stays 0 rather than 0 / 0 = nan.
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(logits == 0, 0.0, logits / rows.temperature)
    if rows.top_k is not None:
        logits = top_k_filter(logits, rows.top_k, rows.top_k_max)
    if rows.top_p is not None:
        logits = top_p_filter(logits, rows.top_p)
    if rows.min_p is not None:
        logits = min_p_filter(logits, rows.min_p)
    p = logits.float().softmax(dim=-1)
    return p if rows.greedy is None else torch.where(rows.greedy, one_hot, p)


def draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator | None] | None = None
         ) -> torch.Tensor:
    """One token id per row (B,) drawn from probs (B, V); a list gives each row its own generator.

    Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p exactly, like
    torch.multinomial, but without the device-to-host sync multinomial needs on CUDA.
    """
    if isinstance(generator, Sequence):
        race = torch.stack([torch.empty_like(row).exponential_(1, generator=g) for row, g in zip(probs, generator)])
    else:
        race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams | RowParams,
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id (B,) for each row of logits (B, V)."""
    rows = as_rows(params, logits)
    if rows.all_greedy:
        return apply_penalties(logits, rows, seen, counts).argmax(dim=-1)
    return draw(probs(logits, rows, seen, counts), generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's raw distribution (before any sampling filter), as Meta reports."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
