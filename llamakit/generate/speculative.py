"""Speculative decoding: a cheap drafter proposes up to γ tokens, the target model checks them all in one forward.

The acceptance rule is that of Leviathan et al. 2023 / Chen et al. 2023: a drafted token x, drawn from the draft's
distribution p, is kept with probability min(1, q(x) / p(x)), q being the target's; the first rejected one is
replaced by a draw from norm(max(0, q - p)), and when all are kept a bonus token is drawn from the target's next
distribution. Every token is then distributed exactly as the target alone would draw it. q and p both come from
`sampling.probs`, so this holds for the distributions after temperature, top-k, top-p and min-p; greedy (one-hot q
and p) gives the target's greedy output token for token.

Two drafters: `ModelDrafter` (a smaller model with the same vocabulary, sampling from its own KV cache) and
`PromptLookupDrafter` (Saxena's prompt-lookup decoding: the tokens that followed the last n-gram where it occurred
earlier in the prompt or output; deterministic, so p is one-hot at each drafted token).

Batch size 1 only: each row would accept a different number of tokens, which the cache supports (a rollback per
slot) but the drivers here do not yet.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.decode import Completion, RowOutput, check_prompts
from llamakit.generate.engine import prefill
from llamakit.generate.sampling import SamplingParams, draw, probs
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer


class Drafter(Protocol):
    """Proposes the next tokens of a sequence, with the distribution each was drawn from."""

    def propose(self, sequence: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow `sequence` and their draft distributions (n, V), or None when the drafts are
        deterministic (p one-hot at each drafted token); no tokens means a plain decoding step."""
        ...

    def close(self) -> None:
        """Free what the drafter holds (a KV cache slot)."""
        ...


class ModelDrafter:
    """Drafts by sampling a draft model autoregressively, with the same settings, from its own KV cache slot."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.slot = cache.acquire()
        self.fed: list[int] = []  # the tokens in the slot, in order

    @torch.inference_mode()
    def propose(self, sequence, k, params, generator):
        if k < 1:
            return [], None
        # The slot keeps the last call's drafts; forget those the target rejected, feed what is new.
        common = 0
        for a, b in zip(self.fed, sequence[:-1]):
            if a != b:
                break
            common += 1
        self.cache.rollback(self.slot, len(self.fed) - common)
        self.fed = list(sequence[:common])
        logits = prefill(self.model, self.cache, self.slot, sequence[common:])  # (V,)
        self.fed += sequence[common:]
        drafts, dists = [], []
        for i in range(k):
            p = probs(logits[None], params)  # (1, V)
            token = int(draw(p, generator))
            drafts.append(token)
            dists.append(p[0])
            if i < k - 1:
                logits = self.model(torch.tensor([[token]], device=p.device), self.cache, [self.slot])[0, -1]  # (V,)
                self.fed.append(token)
        return drafts, torch.stack(dists)  # (k, V)

    def close(self) -> None:
        self.cache.release(self.slot)


class PromptLookupDrafter:
    """Prompt-lookup decoding: find the last n-gram (n = max_ngram down to 1) earlier in the sequence and propose
    the tokens that followed its latest occurrence."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise LlamakitError(f"max_ngram must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, sequence, k, params, generator):
        seq = list(sequence)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            pattern = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
                if seq[start:start + n] == pattern:
                    follow = seq[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def close(self) -> None:
        pass


@dataclass
class SpeculativeStats:
    """How well the drafts did: tokens drafted and accepted, and target forwards spent."""

    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def verify(drafts: Sequence[int], p: torch.Tensor | None, q: torch.Tensor,
           generator: torch.Generator | None) -> tuple[int, int]:
    """The acceptance rule: how many drafts to keep, and the token after them.

    q (n+1, V): the target's distributions at each draft and after the last; p (n, V) the draft's, or None for
    one-hot drafts. Keep x_i with probability min(1, q_i(x_i) / p_i(x_i)); at the first rejection draw from
    norm(max(0, q_i - p_i)); if all are kept, draw the bonus token from q_{n+1}.
    """
    n = len(drafts)
    if n:
        x = torch.tensor(drafts, device=q.device)
        if p is None:
            p = torch.zeros_like(q[:n]).scatter_(-1, x[:, None], 1.0)  # (n, V)
        rows = torch.arange(n, device=q.device)
        ratio = (q[rows, x] / p[rows, x]).clamp(max=1.0)  # (n,)
        u = torch.rand(n, device=q.device, generator=generator)
        rejected = (u >= ratio).tolist()
        for i in range(n):
            if rejected[i]:
                residual = (q[i] - p[i]).clamp(min=0)  # (V,)
                total = residual.sum()
                # q == p up to rounding leaves nothing: then the rejection had probability ~0; q is as good
                residual = residual / total if total > 0 else q[i]
                return i, int(draw(residual[None], generator))
    return n, int(draw(q[n:n + 1], generator))


def speculative_stream(target: Transformer, tokenizer: Tokenizer | None, prompt: Sequence[int],
                       max_new_tokens: int, params: SamplingParams, drafter: Drafter, gamma: int = 4, *,
                       stop_ids: frozenset[int] | None = None, stop_strings: Sequence[str] = (),
                       generator: torch.Generator | None = None, follows_prompt: bool = True,
                       stats: SpeculativeStats | None = None) -> Generator[str, None, Completion]:
    """Yield one prompt's completion as text pieces, decoded speculatively; return the Completion.

    Batch size 1. `stats` (if given) is updated as decoding goes. Penalties that depend on the text so far
    (repetition, presence, frequency) are not supported: each drafted position would need its own.
    """
    _check(target, params, gamma, drafter)
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
    stats = stats if stats is not None else SpeculativeStats()
    cache = KVCache.for_model(target, 1, len(prompt) + max(max_new_tokens, 1) + gamma + 1)
    check_prompts([prompt], [max_new_tokens], cache.free_slots, cache.max_seq_len)
    row = RowOutput(tokenizer, max_new_tokens, stop_ids, stop_strings, follows_prompt)
    slot = cache.acquire()
    device = cache.k.device
    sequence = list(prompt)
    try:
        if len(prompt) > 1:  # the cache holds the sequence but its last token, which the next forward feeds
            prefill(target, cache, slot, prompt[:-1])
        while not row.done:
            k = min(gamma, max_new_tokens - len(row.tokens) - 1)  # the token after the drafts needs room too
            drafts, p = drafter.propose(sequence, k, params, generator) if k > 0 else ([], None)
            drafts = drafts[:k]
            p = p[:len(drafts)] if p is not None else None
            with torch.inference_mode():
                fed = torch.tensor([[sequence[-1], *drafts]], device=device)  # (1, n+1)
                q = probs(target(fed, cache, [slot])[0], params)  # (n+1, V)
            n, extra = verify(drafts, p, q, generator)
            cache.rollback(slot, len(drafts) - n)  # keep the last token and the accepted drafts
            stats.drafted += len(drafts)
            stats.accepted += n
            stats.target_forwards += 1
            for token in [*drafts[:n], extra]:
                sequence.append(token)
                piece = row.push(token)
                if piece:
                    yield piece
                if row.done:
                    break
    finally:
        cache.release(slot)
        drafter.close()
    return row.completion()


def speculative_generate(target: Transformer, tokenizer: Tokenizer | None, prompt: Sequence[int],
                         max_new_tokens: int, params: SamplingParams, drafter: Drafter, gamma: int = 4, *,
                         stop_ids: frozenset[int] | None = None, stop_strings: Sequence[str] = (),
                         generator: torch.Generator | None = None) -> tuple[Completion, SpeculativeStats]:
    """Complete one prompt (token ids, BOS included) speculatively; return the Completion and the draft stats.

    The drafter is closed afterwards (a ModelDrafter frees its slot), so give each call a new one.
    """
    stats = SpeculativeStats()
    pieces = speculative_stream(target, tokenizer, prompt, max_new_tokens, params, drafter, gamma,
                                stop_ids=stop_ids, stop_strings=stop_strings, generator=generator, stats=stats)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value, stats


class Speculation:
    """Speculative decoding for a run of calls (a CLI command, a chat): a fresh drafter for each, stats summed.

    draft None drafts by prompt lookup (n-grams up to max_ngram); else the draft model drafts.
    """

    def __init__(self, target: Transformer, draft: Transformer | None = None, gamma: int = 4, max_ngram: int = 3):
        if draft is not None and draft.config.vocab_size != target.config.vocab_size:
            raise LlamakitError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                                f"target's ({target.config.vocab_size}); use a draft trained with the same tokenizer")
        self.target, self.draft, self.gamma, self.max_ngram = target, draft, gamma, max_ngram
        self.stats = SpeculativeStats()

    def stream(self, tokenizer: Tokenizer | None, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
               **options) -> Generator[str, None, Completion]:
        """`speculative_stream` with a new drafter; options as there. Bad settings are refused now, not at the first
        piece."""
        _check(self.target, params, self.gamma, PromptLookupDrafter())
        if self.draft is None:
            drafter: Drafter = PromptLookupDrafter(self.max_ngram)
        else:
            drafter = model_drafter(self.draft, self.target, len(prompt) + max_new_tokens + self.gamma + 1)
        return speculative_stream(self.target, tokenizer, prompt, max_new_tokens, params, drafter, self.gamma,
                                  stats=self.stats, **options)

    def summary(self) -> str:
        s = self.stats
        return (f"speculative decoding: {s.accepted}/{s.drafted} drafted tokens accepted "
                f"({s.acceptance_rate:.0%}), {s.target_forwards} target forwards")


def model_drafter(draft: Transformer, target: Transformer, max_seq_len: int) -> ModelDrafter:
    """A ModelDrafter with a one-slot cache of max_seq_len positions; refuses a draft with another vocabulary."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise LlamakitError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                            f"target's ({target.config.vocab_size}); use a draft trained with the same tokenizer")
    return ModelDrafter(draft, KVCache.for_model(draft, 1, max_seq_len))


def _check(target: Transformer, params: SamplingParams, gamma: int, drafter: Drafter) -> None:
    if isinstance(drafter, ModelDrafter) and drafter.model.config.vocab_size != target.config.vocab_size:
        raise LlamakitError(f"the draft model's vocabulary ({drafter.model.config.vocab_size} tokens) differs from "
                            f"the target's ({target.config.vocab_size}); use a draft trained with the same tokenizer")
    if gamma < 1:
        raise LlamakitError(f"speculative decoding drafts at least 1 token per step; got gamma={gamma}")
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        raise LlamakitError("speculative decoding does not support repetition, presence or frequency penalties; "
                            "drop them or decode without a draft")
