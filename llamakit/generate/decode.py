"""Generating text: `generate` (a batch of prompts) and `stream` (one prompt, piece by piece) drive the engine's
Decoder, turning tokens into text that stops at a stop token, a stop string or the budget; plus the checks
that refuse a request before any work starts, and the CPU weight layout that decodes fastest.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from llamakit.errors import LlamakitError
from llamakit.generate import cpu_linear
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.engine import Decoder
from llamakit.generate.sampling import SamplingParams
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One row's output; `tokens` exclude the stop token, `text` excludes a stop string."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or stop string) or "length" (budget spent)
    logprobs: list[float] | None = None  # log p of each token in `tokens`
    prompt_logprobs: list[float] | None = None  # log p of prompt tokens 1.. given those before


def check_prompts(prompts: Sequence[Sequence[int]], budgets: Sequence[int], max_batch_size: int,
                  max_seq_len: int) -> None:
    """Refuse what would otherwise fail mid-way or silently truncate: raise a clear LlamakitError."""
    if not prompts:
        raise LlamakitError("no prompts given; pass at least one")
    if len(prompts) > max_batch_size:
        raise LlamakitError(f"{len(prompts)} prompts exceed max_batch_size={max_batch_size}; "
                            "pass fewer prompts per call or build with a larger max_batch_size")
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if not prompt:
            raise LlamakitError(f"prompt {i} is empty; give it some text")
        if len(prompt) >= max_seq_len:
            raise LlamakitError(f"prompt {i} has {len(prompt)} tokens, leaving no room to generate within "
                                f"max_seq_len={max_seq_len}; shorten it or raise max_seq_len")
        if budget < 1:
            raise LlamakitError(f"prompt {i} is given {budget} new tokens; ask for at least 1")


def check_context(window: int, trained: int, setting: str, override: str, extend: bool) -> None:
    """Refuse a context window beyond the model's trained max_seq_len unless extend (then warn): positions past
    it were never trained, so the model's quality drops there without any error."""
    if window <= trained:
        return
    if not extend:
        raise LlamakitError(f"{setting} is beyond the model's {trained}-token context (its max_seq_len); use at most "
                            f"{trained}, or {override} to run past it deliberately")
    log.warning("%s is beyond the model's %d-token context: positions past %d were never trained and the model's "
                "quality drops there (RoPE is not rescaled)", setting, trained, trained)


@torch.no_grad()
def prepare_for_decoding(model: Transformer) -> Transformer:
    """Give fp32 CPU weight matrices the kernels and layout that run inference fastest on this machine (same
    values, same shapes, same state dict): OpenBLAS and oneDNN with row-major weights where they win
    (generate/cpu_linear.py), else MKL with the weights column-major.

    A decode step multiplies one row per sequence by each matrix, bound by how fast the kernel streams the
    weights. MKL streams a weight stored as (in, out) nearly twice as fast as torch's usual (out, in) layout
    for such skinny products; OpenBLAS streams (out, in) faster still on the AMD machines we measure.
    bf16/fp16 and GPU kernels gain nothing from either, so other weights are left alone.
    """
    fp32_on_cpu = any(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    if fp32_on_cpu and cpu_linear.use_rowwise():  # the timing only where its answer matters (bf16, CUDA: skipped)
        return cpu_linear.route_rowwise(model)
    # A tied embedding is also the output matrix, the largest of all; looking up one of its rows
    # column-major costs a strided gather of `dim` values, which is negligible.
    tied = [model.embed_tokens] if model.config.tie_word_embeddings else []
    for module in [m for m in model.modules() if isinstance(m, torch.nn.Linear)] + tied:
        w = module.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            module.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
    return model


class RowOutput:
    """Collects one row's tokens and text until a stop token, a stop string or its budget."""

    def __init__(self, tokenizer: Tokenizer | None, budget: int, stop_ids: frozenset[int] = frozenset(),
                 stop_strings: Sequence[str] = (), follows_prompt: bool = True):
        if stop_strings and tokenizer is None:
            raise LlamakitError("stop strings need a tokenizer to turn tokens into text")
        self.budget, self.stop_ids, self.stop_strings = budget, stop_ids, [s for s in stop_strings if s]
        self.decoder = tokenizer.stream(follows_prompt) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out by push()
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprob: float | None = None) -> str:
        """Add one generated token; return the text that is now final (held back while it could
        still turn out to begin a stop string)."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.decoder is not None:
            self.text += self.decoder.push(token)
            if self._cut_at_stop_string():
                return self._finish("stop", flush=False)
        if len(self.tokens) >= self.budget:
            return self._finish("length")
        return self._release(len(self.text) - self._held_back())

    def completion(self, prompt_logprobs: list[float] | None = None) -> Completion:
        return Completion(self.tokens, self.text, self.finish_reason or "length",
                          self.logprobs if self.logprobs else None, prompt_logprobs)

    def _finish(self, reason: str, flush: bool = True) -> str:
        self.finish_reason = reason
        if flush and self.decoder is not None:
            self.text += self.decoder.flush()
            self._cut_at_stop_string()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def _cut_at_stop_string(self) -> bool:
        """Cut text before the first stop string in it; True if there was one."""
        hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _held_back(self) -> int:
        """Length of the longest text suffix that is the start of a stop string."""
        return max((k for s in self.stop_strings for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])),
                   default=0)


def generate(model: Transformer, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]],
             max_new_tokens: int | Sequence[int], params: SamplingParams | Sequence[SamplingParams], *,
             stop_ids: frozenset[int] | None = None, stop_strings: Sequence[str] = (), logprobs: bool = False,
             prompt_logprobs: bool = False, generator: torch.Generator | None = None,
             cache: KVCache | None = None, compiled: CompiledDecode | None = None) -> list[Completion]:
    """Complete every prompt (token ids, BOS included) in one batch; return the completions in order.

    Each text continues its prompt: prompt text + completion text reads as the whole sequence. params may
    give each prompt its own settings. A finished row leaves the batch at once. `cache` (free slots for
    every prompt) is reused across calls; without one, a cache of exactly the needed size is made (with
    `compiled`, which decodes with a compiled step, one rounded up to shapes that nearby calls share).
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    row_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
    if cache is None:
        # max(b, 1): a budget below 1 is then refused as such, not as a prompt too long for the cache
        new_cache = compiled.cache if compiled is not None else partial(KVCache.for_model, model)
        cache = new_cache(max(len(prompts), 1), max((len(p) + max(b, 1) for p, b in zip(prompts, budgets)), default=1))
    check_prompts(prompts, budgets, cache.free_slots, cache.max_seq_len)
    rows = [RowOutput(tokenizer, b, stop_ids, stop_strings) for b in budgets]
    decoder = Decoder(model, cache, generator, logprobs, decode=compiled)
    try:
        requests = decoder.add(prompts, row_params, budgets, prompt_logprobs)
        output = dict(zip(requests, rows))
        while decoder.live:
            for token in decoder.step():
                row = output[token.request]
                row.push(token.id, token.logprob)
                if row.done:
                    decoder.finish(token.request)
    finally:
        decoder.close()
    return [row.completion(r.prompt_logprobs) for row, r in zip(rows, requests)]


def stream(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], max_new_tokens: int,
           params: SamplingParams, *, stop_ids: frozenset[int] | None = None, stop_strings: Sequence[str] = (),
           generator: torch.Generator | None = None, follows_prompt: bool = True,
           cache: KVCache | None = None, compiled: CompiledDecode | None = None) -> Generator[str, None, Completion]:
    """Yield the completion of one prompt as text pieces, as soon as each is final; return the Completion.

    follows_prompt=False decodes the output as a text of its own (e.g. a chat reply: no leading space).
    `compiled` decodes with a compiled step, as in `generate`.
    """
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    if cache is None:
        new_cache = compiled.cache if compiled is not None else partial(KVCache.for_model, model)
        cache = new_cache(1, len(prompt) + max(max_new_tokens, 1))
    check_prompts([prompt], [max_new_tokens], cache.free_slots, cache.max_seq_len)
    row = RowOutput(tokenizer, max_new_tokens, stop_ids, stop_strings, follows_prompt)
    decoder = Decoder(model, cache, generator, decode=compiled)
    try:
        decoder.add([prompt], [params], [max_new_tokens])
        while not row.done:
            [token] = decoder.step()
            piece = row.push(token.id)
            if piece:
                yield piece
    finally:  # also when the caller stops early: the slot is free for the next call
        decoder.close()
    return row.completion()
