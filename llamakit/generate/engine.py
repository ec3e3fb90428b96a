"""The inference engine: `prefill` and `decode_one` on a caller-owned KVCache, and a `Decoder` that keeps
many sequences live on one cache.

The primitives follow gpt-fast's prefill / decode_one_token: a prompt is appended to a slot in bounded
chunks, and one step appends one token to each of any set of slots. The Decoder adds requests into
free slots at any time (each with its own sampling settings and random stream), advances every live
one by a token per step, and drops a finished one at once, so it costs no more compute. `generate`,
`stream`, the Meta API, chat, evaluation and the server drive it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.sampling import RowParams, SamplingParams, probs, sample, token_logprobs
from llamakit.model import KVCache, Transformer

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds attention memory, keeps the matmuls large


@torch.inference_mode()
def decode_one(model: Transformer, cache: KVCache, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
    """Append one token (B,) to each of `slots`; return the logits for the token after it (B, V)."""
    return model(tokens[:, None], cache, slots)[:, -1]  # (B, V)


def prefill(model: Transformer, cache: KVCache, slot: int, tokens: Sequence[int],
            chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Append a prompt to one slot, chunk_size tokens per forward; return the logits after its last token (V,)."""
    return prefill_batch(model, cache, [slot], [tokens], chunk_size)[0][0]


@torch.inference_mode()
def prefill_batch(model: Transformer, cache: KVCache, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                  chunk_size: int = PREFILL_CHUNK, prompt_logprobs: bool = False
                  ) -> tuple[torch.Tensor, list[list[float]] | None]:
    """Append prompts to slots that hold equally many tokens (fresh ones, usually), right-padded into one forward
    per chunk; return each row's logits after its last token (B, V) and, if asked, the log-probability of every
    prompt token after the first given those before it.

    A row shorter than a chunk writes padding after its end; its length is then set back, so the padding is
    never seen and the next token overwrites it.
    """
    if len({cache.lengths[s] for s in slots}) != 1:
        raise LlamakitError("prefill_batch needs slots holding equally many tokens; prefill the others separately")
    if any(not p for p in prompts):
        raise LlamakitError("cannot prefill an empty prompt; give it at least one token")
    device, lengths = cache.k.device, [len(p) for p in prompts]
    B, T = len(prompts), max(lengths)
    tokens = torch.zeros(B, T + 1, dtype=torch.long)  # one spare column: the target after the last token
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = torch.as_tensor(prompt)
    tokens = tokens.to(device)
    last = torch.empty(B, model.config.vocab_size, device=device)
    lps: list[list[float]] | None = [[] for _ in prompts] if prompt_logprobs else None
    for c0 in range(0, T, chunk_size):
        rows = [b for b in range(B) if lengths[b] > c0]  # rows with tokens left; each holds c0 of them already
        width = max(min(lengths[b], c0 + chunk_size) for b in rows) - c0
        ends = torch.tensor([min(lengths[b] - c0, width) - 1 for b in rows], device=device)  # (R,)
        chunk = tokens[rows, c0:c0 + width]  # (R, width)
        chunk_slots = [slots[b] for b in rows]
        if lps is None:
            logits = model(chunk, cache, chunk_slots, logits_at=ends)[:, 0]  # (R, V)
        else:
            full = model(chunk, cache, chunk_slots)  # (R, width, V)
            rows_lp = token_logprobs(full, tokens[rows, c0 + 1:c0 + width + 1]).tolist()  # (R, width)
            for b, row_lp in zip(rows, rows_lp):
                lps[b] += row_lp[:max(0, lengths[b] - 1 - c0)]
            logits = full[torch.arange(len(rows), device=device), ends]  # (R, V)
        last[rows] = logits
        for b in rows:
            cache.rollback(slots[b], max(0, c0 + width - lengths[b]))  # forget the padding
    return last, lps


class Request:
    """One request on a Decoder: where it lives in the cache, how it samples, and what it has yet to feed."""

    def __init__(self, prompt: list[int], params: SamplingParams, slot: int, generator: torch.Generator | None,
                 seen: torch.Tensor | None):
        self.prompt, self.params, self.slot, self.generator, self.seen = prompt, params, slot, generator, seen
        self.logits: torch.Tensor | None = None  # (V,): the distribution of its next token, before sampling
        self.pending: int | None = None  # the token last sampled, not yet in the cache
        self.prompt_logprobs: list[float] | None = None
        self.generated = 0


class Decoder:
    """Sequences decoding together on one KVCache: `add` prefills requests into free slots (at any time),
    `step` gives every live one its next token, `finish` frees a slot.

    Each request samples with its own settings, and with its own random stream when its params carry a
    seed (else from `generator`, shared), so a request's tokens do not depend on what else is running.
    """

    def __init__(self, model: Transformer, cache: KVCache, generator: torch.Generator | None = None,
                 logprobs: bool = False):
        self.model, self.cache, self.generator, self.logprobs = model, cache, generator, logprobs
        self.live: list[Request] = []
        self._rows: tuple[tuple[Request, ...], RowParams] | None = None  # settings of the last step's rows

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], max_new_tokens: Sequence[int],
            prompt_logprobs: bool = False) -> list[Request]:
        """Prefill each prompt (BOS included) into a free slot, in one batch; return their handles in order."""
        if len(prompts) > self.cache.free_slots:
            raise LlamakitError(f"{len(prompts)} prompts need as many free KV cache slots; {self.cache.free_slots} "
                                "are free")
        for i, (prompt, budget) in enumerate(zip(prompts, max_new_tokens)):
            if len(prompt) + budget > self.cache.max_seq_len:
                raise LlamakitError(f"prompt {i} ({len(prompt)} tokens) and {budget} new tokens do not fit the KV "
                                    f"cache's {self.cache.max_seq_len} positions; shorten it or ask for fewer")
        slots = [self.cache.acquire() for _ in prompts]
        try:
            last, lps = prefill_batch(self.model, self.cache, slots, prompts, prompt_logprobs=prompt_logprobs)
        except BaseException:
            for slot in slots:
                self.cache.release(slot)
            raise
        added = [self._new(list(p), sp, slot) for p, sp, slot in zip(prompts, params, slots)]
        for b, seq in enumerate(added):
            seq.logits = last[b]
            seq.prompt_logprobs = lps[b] if lps is not None else None
        self.live += added
        return added

    def _new(self, prompt: list[int], params: SamplingParams, slot: int) -> Request:
        device = self.cache.k.device
        generator = self.generator
        if params.seed is not None:
            generator = torch.Generator(device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=device)
            seen[torch.as_tensor(prompt, device=device)] = True
        return Request(prompt, params, slot, generator, seen)

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int, float | None]]:
        """Feed each live sequence's last token, then sample its next one: [(sequence, token, logprob or None)]."""
        fed = [s for s in self.live if s.pending is not None]
        if fed:
            tokens = torch.tensor([s.pending for s in fed], device=self.cache.k.device)
            logits = decode_one(self.model, self.cache, [s.slot for s in fed], tokens)  # (F, V)
            for s, row in zip(fed, logits):
                s.logits, s.pending = row, None
        rows = tuple(self.live)
        if not rows:
            return []
        # One (B, V) tensor: the decode step's output when every row was fed by it, else the rows stacked.
        logits = logits if len(fed) == len(rows) else torch.stack([s.logits for s in rows])  # (B, V)
        next_tokens = self._sample(rows, logits)  # (B,)
        chosen = token_logprobs(logits, next_tokens).tolist() if self.logprobs else [None] * len(rows)
        out = []
        for s, token, lp in zip(rows, next_tokens.tolist(), chosen):
            s.pending, s.logits = token, None
            s.generated += 1
            if s.seen is not None:
                s.seen[token] = True
            out.append((s, token, lp))
        return out

    def _sample(self, rows: tuple[Request, ...], logits: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self._rows[0] != rows:  # settings change only when the set of rows does
            self._rows = rows, RowParams([s.params for s in rows], logits.device)
        params = self._rows[1]
        seen = None
        if params.repetition_penalty is not None:  # rows without a penalty ignore theirs: any row will do
            none = torch.zeros_like(logits[0], dtype=torch.bool)
            seen = torch.stack([none if s.seen is None else s.seen for s in rows])  # (B, V)
        generators = [s.generator for s in rows]
        shared = all(g is generators[0] for g in generators)
        return sample(logits, params, generators[0] if shared else generators, seen)

    def probs(self, seq: Request) -> torch.Tensor:
        """The distribution (V,) the sequence's next token will be drawn from (before `step` samples it)."""
        if seq.logits is None:
            raise LlamakitError("this sequence's next distribution is not computed yet; call step first")
        seen = None if seq.seen is None else seq.seen[None]
        return probs(seq.logits[None], seq.params, seen)[0]

    def finish(self, seq: Request) -> None:
        """Stop a sequence and free its slot for the next request."""
        if seq in self.live:
            self.live.remove(seq)
            self.cache.release(seq.slot)

    def close(self) -> None:
        """Finish every live sequence (e.g. after an error or an early stop)."""
        for seq in list(self.live):
            self.finish(seq)
