"""The inference engine: `prefill` and `decode_one` on a caller-owned KVCache, and a `Decoder` that keeps
many sequences live on one cache.

The primitives follow gpt-fast's prefill / decode_one_token: a prompt is appended to a slot in bounded
chunks, and one step appends one token to each of any set of slots. The Decoder adds requests into
free slots at any time (each with its own sampling settings and random stream), advances every live
one by a token per step, and drops a finished one at once, so it costs no more compute. `generate`,
`stream`, the Meta API, chat, evaluation and the server drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.sampling import RowParams, SamplingParams, probs, sample, token_logprobs
from llamakit.model import KVCache, Transformer

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds attention memory, keeps the matmuls large
# decode_one's signature: what a Decoder calls each step (generate/compiled.py has a compiled one)
DecodeStep = Callable[[Transformer, KVCache, Sequence[int], torch.Tensor], torch.Tensor]


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


@torch.inference_mode()
def append_rows(model: Transformer, cache: KVCache, slots: Sequence[int], rows: Sequence[Sequence[int]]
                ) -> torch.Tensor:
    """Append a few tokens to each slot (any lengths, e.g. speculative drafts) in one forward, right-padded to the
    longest row; return the logits at every position (B, T, V).

    Each row sees only its own slot, at its own positions, so the padding after a shorter row's tokens changes
    none of its logits; it is written to the cache, though, and the caller rolls it back (with whatever else
    it rejects). For long prompts use `prefill_batch`, which bounds the forward's memory.
    """
    if any(not r for r in rows):
        raise LlamakitError("append_rows needs at least one token per row")
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = torch.as_tensor(row)
    return model(tokens.to(cache.k.device), cache, slots)  # (B, T, V)


class Token(NamedTuple):
    """One generated token: whose, which, its log-probability and the most likely alternatives, if asked."""

    request: Request
    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class Request:
    """One request on a Decoder: where it lives in the cache, how it samples, and what it has yet to feed."""

    def __init__(self, prompt: list[int], params: SamplingParams, slot: int, generator: torch.Generator | None,
                 logprobs: bool, top_logprobs: int, min_tokens: int, stop_ids: frozenset[int]):
        self.prompt, self.params, self.slot, self.generator = prompt, params, slot, generator
        self.logprobs, self.top_logprobs = logprobs or top_logprobs > 0, top_logprobs
        self.min_tokens, self.stop_ids = min_tokens, sorted(stop_ids)  # stop ids are banned before min_tokens
        self.prefilled = 0  # prompt tokens in the cache so far
        self.logits: torch.Tensor | None = None  # (V,): the distribution of its next token, before sampling
        self.pending: int | None = None  # the token last sampled, not yet in the cache
        self.prompt_logprobs: list[float] | None = None
        self.generated = 0
        self.seen: torch.Tensor | None = None  # (V,) bool: in the prompt or output (repetition penalty)
        self.counts: torch.Tensor | None = None  # (V,): times in the output (presence/frequency penalties)


class Decoder:
    """Sequences decoding together on one KVCache: `add` prefills requests into free slots (at any time),
    `step` gives every live one its next token, `finish` frees a slot.

    Each request samples with its own settings, and with its own random stream when its params carry a
    seed (else from `generator`, shared), so a request's tokens do not depend on what else is running.
    `enqueue` admits requests whose prompts are prefilled a chunk per `step` instead, so a long prompt
    does not stall the requests already decoding (continuous batching).
    """

    def __init__(self, model: Transformer, cache: KVCache, generator: torch.Generator | None = None,
                 logprobs: bool = False, prefill_chunk: int = PREFILL_CHUNK, decode: DecodeStep | None = None):
        self.model, self.cache, self.generator, self.logprobs = model, cache, generator, logprobs
        self.decode = decode or decode_one
        self.prefill_chunk = prefill_chunk
        self.live: list[Request] = []
        self.prefilling: list[Request] = []  # enqueued, prompt not yet all in the cache
        self._rows: tuple[tuple[Request, ...], RowParams] | None = None  # settings of the last step's rows

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], max_new_tokens: Sequence[int],
            prompt_logprobs: bool = False, **options) -> list[Request]:
        """Prefill each prompt (BOS included) into a free slot, in one batch, now; return their handles in order.

        options: logprobs, top_logprobs, min_tokens and stop_ids (banned until min_tokens), as in `enqueue`.
        """
        added = self._admit(prompts, params, max_new_tokens, **options)
        try:
            last, lps = prefill_batch(self.model, self.cache, [r.slot for r in added], prompts,
                                      self.prefill_chunk, prompt_logprobs)
        except BaseException:
            for r in added:
                self.cache.release(r.slot)
            raise
        for b, r in enumerate(added):
            r.logits, r.prefilled = last[b], len(r.prompt)
            r.prompt_logprobs = lps[b] if lps is not None else None
        self.live += added
        return added

    def enqueue(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                max_new_tokens: Sequence[int], *, logprobs: bool = False, top_logprobs: int = 0, min_tokens: int = 0,
                stop_ids: frozenset[int] = frozenset()) -> list[Request]:
        """Take a free slot for each prompt; `step` prefills them, a chunk at a time, then decodes them."""
        added = self._admit(prompts, params, max_new_tokens, logprobs=logprobs, top_logprobs=top_logprobs,
                            min_tokens=min_tokens, stop_ids=stop_ids)
        self.prefilling += added
        return added

    def _admit(self, prompts, params, max_new_tokens, *, logprobs: bool = False, top_logprobs: int = 0,
               min_tokens: int = 0, stop_ids: frozenset[int] = frozenset()) -> list[Request]:
        if len(prompts) > self.cache.free_slots:
            raise LlamakitError(f"{len(prompts)} prompts need as many free KV cache slots; {self.cache.free_slots} "
                                "are free")
        for i, (prompt, budget) in enumerate(zip(prompts, max_new_tokens)):
            if not prompt:
                raise LlamakitError(f"prompt {i} is empty; give it at least one token")
            if len(prompt) + budget > self.cache.max_seq_len:
                raise LlamakitError(f"prompt {i} ({len(prompt)} tokens) and {budget} new tokens do not fit the KV "
                                    f"cache's {self.cache.max_seq_len} positions; shorten it or ask for fewer")
        device = self.cache.k.device
        added = []
        for prompt, sp in zip(prompts, params):
            generator = torch.Generator(device).manual_seed(sp.seed) if sp.seed is not None else self.generator
            r = Request(list(prompt), sp, self.cache.acquire(), generator, logprobs or self.logprobs, top_logprobs,
                        min_tokens, stop_ids)
            if sp.repetition_penalty != 1.0:
                r.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=device)
                r.seen[torch.as_tensor(r.prompt, device=device)] = True
            if sp.presence_penalty or sp.frequency_penalty:
                r.counts = torch.zeros(self.model.config.vocab_size, device=device)
            added.append(r)
        return added

    @torch.inference_mode()
    def step(self) -> list[Token]:
        """Prefill the next chunk of enqueued prompts, feed each live request its last token, then sample its
        next one."""
        self._prefill_some()
        fed = [r for r in self.live if r.pending is not None]
        if fed:
            tokens = torch.tensor([r.pending for r in fed], device=self.cache.k.device)
            logits = self.decode(self.model, self.cache, [r.slot for r in fed], tokens)  # (F, V)
            for r, row in zip(fed, logits):
                r.logits, r.pending = row, None
        rows = tuple(self.live)
        if not rows:
            return []
        # One (B, V) tensor: the decode step's output when every row was fed by it, else the rows stacked.
        logits = logits if len(fed) == len(rows) else torch.stack([r.logits for r in rows])  # (B, V)
        next_tokens = self._sample(rows, logits)  # (B,)
        chosen, top = self._logprobs(rows, logits, next_tokens)
        out = []
        for r, token, lp, alternatives in zip(rows, next_tokens.tolist(), chosen, top):
            r.pending, r.logits = token, None
            r.generated += 1
            if r.seen is not None:
                r.seen[token] = True
            if r.counts is not None:
                r.counts[token] += 1
            out.append(Token(r, token, lp, alternatives))
        return out

    def _prefill_some(self) -> None:
        """Spend up to prefill_chunk prompt tokens: fresh prompts that fit together in one batched forward, or
        the next chunk of the first one."""
        if not self.prefilling:
            return
        group, total = [], 0
        for r in self.prefilling:
            if r.prefilled or total + len(r.prompt) > self.prefill_chunk:
                break
            group.append(r)
            total += len(r.prompt)
        if group:
            last, _ = prefill_batch(self.model, self.cache, [r.slot for r in group], [r.prompt for r in group],
                                    self.prefill_chunk)
            for b, r in enumerate(group):
                r.logits, r.prefilled = last[b], len(r.prompt)
        else:
            r = self.prefilling[0]
            chunk = torch.tensor([r.prompt[r.prefilled:r.prefilled + self.prefill_chunk]], device=self.cache.k.device)
            r.logits = self.model(chunk, self.cache, [r.slot], logits_at=-1)[0, -1]  # (V,)
            r.prefilled += chunk.size(1)
        done = [r for r in self.prefilling if r.prefilled == len(r.prompt)]
        self.prefilling = [r for r in self.prefilling if r.prefilled < len(r.prompt)]
        self.live += done

    def _sample(self, rows: tuple[Request, ...], logits: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self._rows[0] != rows:  # settings change only when the set of rows does
            self._rows = rows, RowParams([r.params for r in rows], logits.device)
        params = self._rows[1]
        early = [b for b, r in enumerate(rows) if r.generated < r.min_tokens and r.stop_ids]
        if early:  # no stop token before min_tokens
            logits = logits.clone()
            for b in early:
                logits[b, rows[b].stop_ids] = float("-inf")
        seen = counts = None
        if params.repetition_penalty is not None:  # rows without a penalty ignore theirs: any row will do
            no_seen = torch.zeros_like(logits[0], dtype=torch.bool)
            seen = torch.stack([no_seen if r.seen is None else r.seen for r in rows])  # (B, V)
        if params.presence_penalty is not None:
            no_counts = torch.zeros_like(logits[0])
            counts = torch.stack([no_counts if r.counts is None else r.counts for r in rows])  # (B, V)
        generators = [r.generator for r in rows]
        shared = all(g is generators[0] for g in generators)
        return sample(logits, params, generators[0] if shared else generators, seen, counts)

    def _logprobs(self, rows: tuple[Request, ...], logits: torch.Tensor, tokens: torch.Tensor
                  ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Each row's log p(token) under the raw distribution, and its top_logprobs most likely tokens."""
        none = [None] * len(rows)
        if not any(r.logprobs for r in rows):
            return none, none
        logprobs = logits.float().log_softmax(dim=-1)  # (B, V)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        k = max(r.top_logprobs for r in rows)
        top = none
        if k:
            values, ids = logprobs.topk(k, dim=-1)  # (B, k)
            top = [list(zip(i[:r.top_logprobs], v[:r.top_logprobs])) if r.top_logprobs else None
                   for r, i, v in zip(rows, ids.tolist(), values.tolist())]
        return [lp if r.logprobs else None for r, lp in zip(rows, chosen)], top

    def probs(self, request: Request) -> torch.Tensor:
        """The distribution (V,) the request's next token will be drawn from (before `step` samples it)."""
        if request.logits is None:
            raise LlamakitError("this request's next distribution is not computed yet; call step first")
        seen = None if request.seen is None else request.seen[None]
        counts = None if request.counts is None else request.counts[None]
        return probs(request.logits[None], request.params, seen, counts)[0]

    def finish(self, request: Request) -> None:
        """Stop a request (decoding or still prefilling) and free its slot for the next one."""
        for queue in (self.live, self.prefilling):
            if request in queue:
                queue.remove(request)
                self.cache.release(request.slot)

    def close(self) -> None:
        """Finish every request (e.g. after an error or an early stop)."""
        for request in self.live + self.prefilling:
            self.finish(request)
