"""The decode loop: prefill a KV cache with the prompts, then add one sampled token per row per step.

Rows of different lengths are right-padded and keep their own positions, exactly as if each ran
alone: row b's token at step s sits at position len_b + s, is written to cache slot len_b + s, and
attends to slots 0..len_b + s only (the padding after a short prompt is overwritten before any
query can see it). Batches whose rows all have the same length and budget take a mask-free path.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.sampling import SamplingParams, sample, token_logprobs
from llamakit.model import Transformer
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
    """Store fp32 CPU weight matrices column-major (same values, same shapes, new strides).

    A decode step multiplies one row per sequence by each matrix. On CPU, MKL streams a weight
    stored as (in, out) nearly twice as fast as PyTorch's usual (out, in) layout for such skinny
    products (benchmarks/decode.py), so this brings decoding close to the memory-bandwidth bound.
    bf16/fp16 and GPU kernels gain nothing from it, so other weights are left alone.
    """
    # A tied embedding is also the output matrix, the largest of all; looking up one of its rows
    # column-major costs a strided gather of `dim` values, which is negligible.
    tied = [model.embed_tokens] if model.lm_head is None else []
    for module in [m for m in model.modules() if isinstance(m, torch.nn.Linear)] + tied:
        w = module.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            module.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
    return model


def ensure_kv_cache(model: Transformer, batch_size: int, seq_len: int) -> None:
    """Reuse the model's KV cache when it is big enough, else allocate one of exactly this size."""
    cache = model.layers[0].self_attn.kv_cache
    if cache is None or cache.max_batch_size < batch_size or cache.max_seq_len < seq_len:
        model.setup_kv_cache(batch_size, seq_len)


@torch.inference_mode()
def decode_steps(model: Transformer, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                 params: SamplingParams, generator: torch.Generator | None = None, logprobs: bool = False,
                 prompt_logprobs: bool = False) -> Iterator[tuple[list[int], list[float] | None]]:
    """Yield (next token of each row, its logprob or None) per step, for max(budgets) steps.

    The first item, when prompt_logprobs is set, is instead (None, per-row lists of prompt logprobs).
    A row past its budget keeps getting tokens (its slot stays at its last one); callers drop them.
    Stop consuming the iterator to stop early: nothing is computed ahead.
    """
    device = model.embed_tokens.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    steps = max(budgets)
    ensure_kv_cache(model, B, max(n + b for n, b in zip(lengths, budgets)))
    lengths_t = torch.tensor(lengths, device=device)
    uniform = len(set(lengths)) == 1 and len(set(budgets)) == 1
    last, prompt_lps = _prefill(model, prompts, lengths_t, uniform, prompt_logprobs)
    if prompt_logprobs:
        yield None, prompt_lps

    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros_like(last, dtype=torch.bool)  # (B, V)
        for b, prompt in enumerate(prompts):
            seen[b, torch.as_tensor(prompt, device=device)] = True

    last_slots = [n + b - 1 for n, b in zip(lengths, budgets)]
    last_slots_t = torch.tensor(last_slots, device=device)
    slot_ids = torch.arange(max(last_slots) + 1, device=device)
    for step in range(steps):
        next_tokens = sample(last, params, generator, seen)  # (B,)
        chosen_lp = token_logprobs(last, next_tokens).tolist() if logprobs else None
        yield next_tokens.tolist(), chosen_lp
        if step + 1 == steps:
            return
        if seen is not None:
            seen[torch.arange(B, device=device), next_tokens] = True
        if uniform:
            last = model(next_tokens[:, None], lengths[0] + step)[:, -1]  # (B, V)
            continue
        slots = torch.minimum(lengths_t + step, last_slots_t)  # (B,): each row's own position
        visible = max(min(n + step, s) for n, s in zip(lengths, last_slots)) + 1
        mask = (slot_ids[:visible] <= slots[:, None])[:, None, None, :]  # (B, 1, 1, S)
        last = model(next_tokens[:, None], slots, mask=mask)[:, -1]  # (B, V)


def _prefill(model: Transformer, prompts: Sequence[Sequence[int]], lengths: torch.Tensor, uniform: bool,
             prompt_logprobs: bool) -> tuple[torch.Tensor, list[list[float]] | None]:
    """Run the right-padded prompts through the model, filling the cache; return each row's last logits (B, V)
    and, if asked, the log-probability of every prompt token after the first."""
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = torch.as_tensor(prompt)
    tokens = tokens.to(lengths.device)  # (B, T), right-padded with id 0
    if not prompt_logprobs:
        return model(tokens, logits_at=T - 1 if uniform else lengths - 1)[:, -1], None  # (B, V)
    logits = model(tokens)  # (B, T, V): the prompts' own log-likelihoods need every position
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:]).tolist()  # (B, T - 1)
    last = logits[torch.arange(B, device=tokens.device), lengths - 1]  # (B, V)
    return last, [row[:len(p) - 1] for row, p in zip(lp, prompts)]


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
             max_new_tokens: int | Sequence[int], params: SamplingParams, *, stop_ids: frozenset[int] | None = None,
             stop_strings: Sequence[str] = (), logprobs: bool = False, prompt_logprobs: bool = False,
             generator: torch.Generator | None = None) -> list[Completion]:
    """Complete every prompt (token ids, BOS included) in one batch; return the completions in order.

    Each text continues its prompt: prompt text + completion text reads as the whole sequence.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
    rows = [RowOutput(tokenizer, b, stop_ids, stop_strings) for b in budgets]
    prompt_lps: list[list[float] | None] = [None] * len(prompts)
    for tokens, lps in decode_steps(model, prompts, budgets, params, generator, logprobs, prompt_logprobs):
        if tokens is None:
            prompt_lps = lps
            continue
        for b, row in enumerate(rows):
            if not row.done:
                row.push(tokens[b], lps[b] if lps else None)
        if all(row.done for row in rows):
            break
    return [row.completion(p) for row, p in zip(rows, prompt_lps)]


def stream(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], max_new_tokens: int,
           params: SamplingParams, *, stop_ids: frozenset[int] | None = None, stop_strings: Sequence[str] = (),
           generator: torch.Generator | None = None, follows_prompt: bool = True) -> Generator[str, None, Completion]:
    """Yield the completion of one prompt as text pieces, as soon as each is final; return the Completion.

    follows_prompt=False decodes the output as a text of its own (e.g. a chat reply: no leading space).
    """
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    row = RowOutput(tokenizer, max_new_tokens, stop_ids, stop_strings, follows_prompt)
    for tokens, _ in decode_steps(model, [prompt], [max_new_tokens], params, generator):
        piece = row.push(tokens[0])
        if piece:
            yield piece
        if row.done:
            break
    return row.completion()
