"""Speculative decoding: a cheap drafter proposes up to γ tokens, the target model checks them all in one forward.

The acceptance rule is that of Leviathan et al. 2023 / Chen et al. 2023: a drafted token x, drawn from the draft's
distribution p, is kept with probability min(1, q(x) / p(x)), q being the target's; the first rejected one is
replaced by a draw from norm(max(0, q - p)), and when all are kept a bonus token is drawn from the target's next
distribution. Every token is then distributed exactly as the target alone would draw it. q and p both come from
`sampling.probs`, so this holds for the distributions after temperature, top-k, top-p and min-p; greedy (one-hot q
and p) gives the target's greedy output token for token.

Prompts decode as one batch, each in its own slot of the target's KV cache (and of the draft's). A step drafts
for every live row (the drafters are in `drafters.py`), feeds each row's last token and drafts to the target in
one forward, right-padded to the longest row (each row attends at its own positions, so padding changes nothing),
and lets each row accept its own prefix: its rejected drafts and padding are rolled back in its slot alone. A row
that samples with a seed draws from its own random stream, so its tokens do not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.decode import Completion, RowOutput, check_prompts
from llamakit.generate.drafters import (
    Drafter,
    ModelDrafter,
    PromptLookupDrafter,
    check_vocabulary,
    model_drafter,
    rows_probs,
)
from llamakit.generate.engine import append_rows, prefill_batch
from llamakit.generate.sampling import SamplingParams, draw
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer

__all__ = ["Drafter", "ModelDrafter", "PromptLookupDrafter", "Speculation", "SpeculativeStats", "model_drafter",
           "speculative_generate", "speculative_rows", "speculative_stream", "verify"]


@dataclass
class SpeculativeStats:
    """How well the drafts did: tokens drafted and accepted, and target forwards spent (one per step for the
    whole batch); `rows` holds each prompt's own counts, for the latest call."""

    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    rows: list[SpeculativeStats] = field(default_factory=list)

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


@dataclass
class _Row:
    """One prompt decoding speculatively: its cache slot, sampling settings, random stream and output so far."""

    index: int
    slot: int
    params: SamplingParams
    generator: torch.Generator | None
    out: RowOutput
    sequence: list[int]  # prompt and output, stop token excluded
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    @property
    def room(self) -> int:
        """Tokens it may draft: the token after the drafts must fit its budget too."""
        return self.out.budget - len(self.out.tokens) - 1


def speculative_rows(target: Transformer, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int | Sequence[int], params: SamplingParams | Sequence[SamplingParams],
                     drafter: Drafter, gamma: int = 4, *, stop_ids: frozenset[int] | None = None,
                     stop_strings: Sequence[str] = (), generator: torch.Generator | None = None,
                     follows_prompt: bool = True, stats: SpeculativeStats | None = None
                     ) -> Generator[tuple[int, str], None, list[Completion]]:
    """Decode prompts (token ids, BOS included) as one batch, speculatively; yield (prompt index, text piece) as
    each piece is final; return the completions in order.

    max_new_tokens and params may be given per prompt; a row with params.seed draws from its own stream, the
    others from `generator`. `stats` (if given) is updated as decoding goes. The drafter is closed at the end.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    row_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    _check(target, row_params, gamma, drafter, len(prompts))
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
    stats = stats if stats is not None else SpeculativeStats()
    # room for the longest row, plus the drafts and padding of one step past it
    longest = max((len(p) + max(b, 1) for p, b in zip(prompts, budgets)), default=1)
    cache = KVCache.for_model(target, max(len(prompts), 1), longest + gamma + 1)
    check_prompts(prompts, budgets, cache.free_slots, cache.max_seq_len)
    rows = []
    for i, (prompt, budget, sp) in enumerate(zip(prompts, budgets, row_params)):
        # a seeded row draws from its own stream (as in the Decoder), so its tokens do not depend on the batch
        own = torch.Generator(cache.k.device).manual_seed(sp.seed) if sp.seed is not None else generator
        out = RowOutput(tokenizer, budget, stop_ids, stop_strings, follows_prompt)
        rows.append(_Row(i, cache.acquire(), sp, own, out, list(prompt)))
    stats.rows = [r.stats for r in rows]
    live = list(rows)
    try:
        # the cache holds each sequence but its last token, which the next forward feeds
        started = [r for r in rows if len(r.sequence) > 1]
        if started:
            prefill_batch(target, cache, [r.slot for r in started], [r.sequence[:-1] for r in started])
        while live:
            for r, tokens in zip(live, _step(target, cache, live, drafter, gamma, stats)):
                for token in tokens:
                    r.sequence.append(token)
                    piece = r.out.push(token)
                    if piece:
                        yield r.index, piece
                    if r.out.done:
                        break
            for r in live:
                if r.out.done:  # its slots go back at once
                    cache.release(r.slot)
                    drafter.release(r.index)
            live = [r for r in live if not r.out.done]
    finally:  # also when the caller stops early
        drafter.close()
    return [r.out.completion() for r in rows]


def _step(target: Transformer, cache: KVCache, live: list[_Row], drafter: Drafter, gamma: int,
          stats: SpeculativeStats) -> list[list[int]]:
    """Draft for every live row, verify all drafts in one target forward; return each row's new tokens (its
    accepted drafts and the token after them)."""
    ks = [max(0, min(gamma, r.room)) for r in live]
    proposed = drafter.propose([r.index for r in live], [r.sequence for r in live], ks, [r.params for r in live],
                               [r.generator for r in live])
    drafts = [(d[:k], None if p is None else p[:len(d[:k])]) for (d, p), k in zip(proposed, ks)]
    with torch.inference_mode():
        fed = [[r.sequence[-1], *d] for r, (d, _) in zip(live, drafts)]
        logits = append_rows(target, cache, [r.slot for r in live], fed)  # (B, T, V)
        B, T, V = logits.shape
        q = rows_probs(logits.reshape(B * T, V), [r.params for r in live for _ in range(T)]).view(B, T, V)
    stats.target_forwards += 1
    new = []
    for r, (d, p), q_row in zip(live, drafts, q):
        n, extra = verify(d, p, q_row[:len(d) + 1], r.generator)
        cache.rollback(r.slot, T - 1 - n)  # keep the last token and the accepted drafts; forget the rest
        for s in (r.stats, stats):
            s.drafted += len(d)
            s.accepted += n
        r.stats.target_forwards += 1
        new.append([*d[:n], extra])
    return new


def speculative_stream(target: Transformer, tokenizer: Tokenizer | None, prompt: Sequence[int],
                       max_new_tokens: int, params: SamplingParams, drafter: Drafter, gamma: int = 4,
                       **options) -> Generator[str, None, Completion]:
    """Yield one prompt's completion as text pieces, decoded speculatively; return the Completion.

    options as in `speculative_rows` (stop_ids, stop_strings, generator, follows_prompt, stats).
    """
    rows = speculative_rows(target, tokenizer, [prompt], max_new_tokens, params, drafter, gamma, **options)
    try:
        while True:
            try:
                _, piece = next(rows)
            except StopIteration as done:
                return done.value[0]
            yield piece
    finally:
        rows.close()


def speculative_generate(target: Transformer, tokenizer: Tokenizer | None,
                         prompts: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                         params: SamplingParams | Sequence[SamplingParams], drafter: Drafter, gamma: int = 4,
                         **options) -> tuple[Completion | list[Completion], SpeculativeStats]:
    """Complete one prompt (a list of token ids, BOS included), or several in one batch, speculatively; return
    the Completion (a list of them for several prompts) and the draft stats.

    options as in `speculative_rows`. The drafter is closed afterwards (a ModelDrafter frees its slots), so give
    each call a new one; a ModelDrafter's cache needs a slot per prompt (`model_drafter(..., max_slots=)`).
    """
    single = bool(prompts) and isinstance(prompts[0], Integral)
    stats = options.pop("stats", None) or SpeculativeStats()
    rows = speculative_rows(target, tokenizer, [prompts] if single else prompts, max_new_tokens, params, drafter,
                            gamma, stats=stats, **options)
    while True:
        try:
            next(rows)
        except StopIteration as done:
            return (done.value[0] if single else done.value), stats


class Speculation:
    """Speculative decoding for a run of calls (a CLI command, a chat): a fresh drafter for each, stats summed.

    draft None drafts by prompt lookup (n-grams up to max_ngram); else the draft model drafts, with its decode
    step torch.compile'd if `compile` (generate/compiled.py; the target verifies several tokens per forward,
    eager).
    """

    def __init__(self, target: Transformer, draft: Transformer | None = None, gamma: int = 4, max_ngram: int = 3,
                 compile: bool = False):
        if draft is not None:
            check_vocabulary(draft, target)
        elif compile:
            raise LlamakitError("compiling speculative decoding compiles the draft model's decode step, and prompt "
                                "lookup has none: leave out --compile (compile=True) or draft with a model")
        self.target, self.draft, self.gamma, self.max_ngram = target, draft, gamma, max_ngram
        self.compiled = CompiledDecode(draft) if compile else None
        self.stats = SpeculativeStats()

    def stream(self, tokenizer: Tokenizer | None, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
               **options) -> Generator[str, None, Completion]:
        """`speculative_stream` with a new drafter; options as there. Bad settings are refused now, not at the first
        piece."""
        _check(self.target, [params], self.gamma, PromptLookupDrafter(), 1)
        drafter = self.drafter([prompt], [max_new_tokens])
        return speculative_stream(self.target, tokenizer, prompt, max_new_tokens, params, drafter, self.gamma,
                                  stats=self.stats, **options)

    def generate(self, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int | Sequence[int], params: SamplingParams | Sequence[SamplingParams],
                 **options) -> list[Completion]:
        """Complete several prompts as one batch with a new drafter; options as in `speculative_rows`."""
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        completions, _ = speculative_generate(self.target, tokenizer, list(prompts), budgets, params,
                                              self.drafter(prompts, budgets), self.gamma, stats=self.stats, **options)
        return completions

    def drafter(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int]) -> Drafter:
        """A drafter for one call: prompt lookup, or the draft model with a cache slot per prompt."""
        if self.draft is None:
            return PromptLookupDrafter(self.max_ngram)
        longest = max((len(p) + b for p, b in zip(prompts, budgets)), default=1)
        return model_drafter(self.draft, self.target, longest + self.gamma + 1, max_slots=max(len(prompts), 1),
                             compiled=self.compiled)

    def summary(self) -> str:
        s = self.stats
        line = (f"speculative decoding: {s.accepted}/{s.drafted} drafted tokens accepted "
                f"({s.acceptance_rate:.0%}), {s.target_forwards} target forwards")
        if len(s.rows) > 1:
            line += "; per prompt: " + ", ".join(f"{r.accepted}/{r.drafted}" for r in s.rows)
        return line


def _check(target: Transformer, params: Sequence[SamplingParams], gamma: int, drafter: Drafter, batch: int) -> None:
    if isinstance(drafter, ModelDrafter):
        check_vocabulary(drafter.model, target)
        if drafter.cache.free_slots < batch:
            raise LlamakitError(f"the draft model's KV cache has {drafter.cache.free_slots} free slots for {batch} "
                                "prompts; give it a slot per prompt (model_drafter(..., max_slots=))")
    if gamma < 1:
        raise LlamakitError(f"speculative decoding drafts at least 1 token per step; got gamma={gamma}")
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        raise LlamakitError("speculative decoding does not support repetition, presence or frequency penalties; "
                            "drop them or decode without a draft")
