"""Drafters for speculative decoding: what proposes the next few tokens of each row for the target to check.

A drafter drafts for a batch: `propose` gets the live rows' sequences and how many tokens each may draft, and
returns each row's drafts with the distributions they were drawn from (None when deterministic: p is one-hot at
each drafted token). Rows are named by their index in the batch, so a drafter that keeps state per row (a
KV cache slot) can keep it across steps and free it with `release` when the row finishes.

`ModelDrafter` samples a smaller model with the same vocabulary, every drafting row in one forward per drafted
position (with the compiled decode step of generate/compiled.py if given: drafting is many one-token steps);
`PromptLookupDrafter` is Saxena's prompt-lookup decoding (the tokens that followed the last n-gram where it
occurred earlier in the row's prompt or output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.engine import DecodeStep, append_rows, decode_one, prefill_batch
from llamakit.generate.sampling import RowParams, SamplingParams, draw, probs
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer.chat import common_prefix

Draft = tuple[list[int], torch.Tensor | None]  # drafted tokens (n,) and their draft distributions (n, V), or None
Generators = Sequence[torch.Generator | None]


class Drafter(Protocol):
    """Proposes the next tokens of each live row, with the distributions they were drawn from."""

    def propose(self, rows: Sequence[int], sequences: Sequence[Sequence[int]], ks: Sequence[int],
                params: Sequence[SamplingParams], generators: Generators) -> list[Draft]:
        """For each row (its index in the batch), up to ks[i] tokens to follow sequences[i], drawn with params[i]
        from generators[i]; no tokens means a plain decoding step for that row."""
        ...

    def release(self, row: int) -> None:
        """Forget a finished row (free its KV cache slot)."""
        ...

    def close(self) -> None:
        """Free everything the drafter holds."""
        ...


class ModelDrafter:
    """Drafts by sampling a draft model autoregressively with each row's settings and random stream, each row in
    its own slot of the draft's KV cache (taken at the row's first draft); all rows draft in one forward per
    drafted position."""

    def __init__(self, model: Transformer, cache: KVCache, step: DecodeStep = decode_one):
        self.model, self.cache, self.step = model, cache, step
        self.slots: dict[int, int] = {}  # row -> its slot in the draft's cache
        self.fed: dict[int, list[int]] = {}  # row -> the tokens in that slot, in order

    @torch.inference_mode()
    def propose(self, rows, sequences, ks, params, generators):
        out: list[Draft] = [([], None) for _ in rows]
        drafting = [i for i, k in enumerate(ks) if k > 0]
        if not drafting:
            return out
        slots = [self._slot(rows[i]) for i in drafting]
        logits = self._catch_up([rows[i] for i in drafting], slots, [sequences[i] for i in drafting])  # (A, V)
        going = list(range(len(drafting)))  # positions in `drafting` of the rows still drafting
        tokens: list[list[int]] = [[] for _ in drafting]
        dists: list[list[torch.Tensor]] = [[] for _ in drafting]
        while True:
            p = rows_probs(logits, [params[drafting[a]] for a in going])  # (G, V)
            picked = draw(p, one_generator([generators[drafting[a]] for a in going])).tolist()
            for a, token, dist in zip(going, picked, p):
                tokens[a].append(token)
                dists[a].append(dist)
            more = [j for j, a in enumerate(going) if len(tokens[a]) < ks[drafting[a]]]
            if not more:
                break
            going = [going[j] for j in more]
            fed = torch.tensor([picked[j] for j in more], device=p.device)  # (G',)
            logits = self.step(self.model, self.cache, [slots[a] for a in going], fed)  # (G', V)
            for a, token in zip(going, fed.tolist()):
                self.fed[rows[drafting[a]]].append(token)
        for a, i in enumerate(drafting):
            out[i] = tokens[a], torch.stack(dists[a])  # (k, V)
        return out

    def _slot(self, row: int) -> int:
        if row not in self.slots:
            self.slots[row], self.fed[row] = self.cache.acquire(), []
        return self.slots[row]

    def _catch_up(self, rows: list[int], slots: list[int], sequences: list[Sequence[int]]) -> torch.Tensor:
        """Bring each slot to its row's sequence: forget the drafts the target rejected (the slot keeps the last
        call's drafts), feed the tokens that are new; return the logits after each row's last token (A, V)."""
        new = []
        for row, slot, sequence in zip(rows, slots, sequences):
            fed = self.fed[row]
            common = common_prefix(fed, sequence[:-1])  # the last token is always fed: its logits are needed
            self.cache.rollback(slot, len(fed) - common)
            new.append(list(sequence[common:]))
            fed[common:] = new[-1]
        if len({self.cache.lengths[s] for s in slots}) == 1:  # e.g. fresh slots and whole prompts: chunked
            return prefill_batch(self.model, self.cache, slots, new)[0]
        logits = append_rows(self.model, self.cache, slots, new)  # (A, T, V)
        for slot, tokens in zip(slots, new):
            self.cache.rollback(slot, logits.size(1) - len(tokens))  # the padding
        ends = torch.tensor([len(t) - 1 for t in new], device=logits.device)
        return logits[torch.arange(len(new), device=logits.device), ends]  # (A, V)

    def release(self, row: int) -> None:
        if row in self.slots:
            self.cache.release(self.slots.pop(row))
            del self.fed[row]

    def close(self) -> None:
        for row in list(self.slots):
            self.release(row)


class PromptLookupDrafter:
    """Prompt-lookup decoding: find the row's last n-gram (n = max_ngram down to 1) earlier in its sequence and
    propose the tokens that followed its latest occurrence."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise LlamakitError(f"max_ngram must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, rows, sequences, ks, params, generators):
        return [(self.lookup(sequence, k), None) for sequence, k in zip(sequences, ks)]

    def lookup(self, sequence: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        seq = list(sequence)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1) if k > 0 else ():
            pattern = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
                if seq[start:start + n] == pattern:
                    follow = seq[start + n:start + n + k]
                    if follow:
                        return follow
        return []

    def release(self, row: int) -> None:
        pass

    def close(self) -> None:
        pass


def model_drafter(draft: Transformer, target: Transformer, max_seq_len: int, max_slots: int = 1,
                  compiled: CompiledDecode | None = None) -> ModelDrafter:
    """A ModelDrafter with a cache of (at least) max_slots rows of max_seq_len positions, drafting with the
    `compiled` step of the draft if given; refuses a draft with another vocabulary."""
    check_vocabulary(draft, target)
    if compiled is None:
        return ModelDrafter(draft, KVCache.for_model(draft, max_slots, max_seq_len))
    return ModelDrafter(draft, compiled.cache(max_slots, max_seq_len), compiled)


def check_vocabulary(draft: Transformer, target: Transformer) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise LlamakitError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                            f"target's ({target.config.vocab_size}); use a draft trained with the same tokenizer")


def rows_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Each row's next-token distribution (N, V) from logits (N, V), under that row's settings."""
    first = params[0]
    shared = all(p == first or replace(p, seed=first.seed) == first for p in params)  # seeds do not change probs
    return probs(logits, params[0] if shared else RowParams(params, logits.device))


def one_generator(generators: Generators) -> torch.Generator | None | list[torch.Generator | None]:
    """What `draw` takes for these rows: their one shared generator, or the list of their own."""
    return generators[0] if all(g is generators[0] for g in generators) else list(generators)
