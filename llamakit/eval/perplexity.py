"""Perplexity of a text with a sliding window: every token scored once, with as much context as the window allows.

The text is encoded with BOS first, and every later token is predicted. Windows of `window` input
tokens start every `stride` tokens; each scores only the tokens no earlier window scored, so a token
sees at least window - stride tokens of context (fewer only at the start of the text). stride ==
window cuts the text into independent chunks; stride 1 gives every token the full window (slow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamakit.errors import EvalError
from llamakit.eval.scoring import score_pairs
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer


@dataclass(frozen=True)
class Perplexity:
    """Totals over a text and the perplexities they give."""

    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens predicted (BOS is not)
    bytes: int  # UTF-8 bytes of the text
    windows: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    def as_dict(self) -> dict[str, float | int]:
        return {"token_perplexity": self.token_perplexity, "byte_perplexity": self.byte_perplexity,
                "bits_per_byte": self.bits_per_byte, "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes,
                "windows": self.windows}


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) per window over tokens 0..n-1: inputs [begin, end), targets (first, end]."""
    if not 1 <= stride <= window:
        raise EvalError(f"stride {stride} must be between 1 and the window ({window}); lower --stride")
    spans, scored, begin = [], 0, 0  # `scored`: the last target index already scored (token 0, BOS, never is)
    while scored < n_tokens - 1:
        end = min(begin + window, n_tokens - 1)
        spans.append((begin, scored, end))
        scored, begin = end, begin + stride
    return spans


def perplexity_of_ids(model: Transformer, ids: list[int], window: int, stride: int, batch_size: int = 8,
                      pad_id: int = 0, progress: bool = False) -> tuple[float, int, int]:
    """(summed NLL, tokens predicted, windows) of token ids (the first is context only)."""
    if len(ids) < 2:
        raise EvalError("the text is empty; perplexity needs at least one token to predict")
    spans = sliding_windows(len(ids), window, stride)
    # a window is a (context, continuation) pair: inputs ids[begin:end] predict ids[first + 1:end + 1]
    pairs = [(ids[begin:first + 1], ids[first + 1:end + 1]) for begin, first, end in spans]
    scores = score_pairs(model, pairs, window, batch_size, pad_id, progress, desc="perplexity")
    return -sum(s.logprob for s in scores), sum(s.n_tokens for s in scores), len(spans)


def text_perplexity(model: Transformer, tokenizer: Tokenizer, text: str, window: int, stride: int | None = None,
                    batch_size: int = 8, progress: bool = False) -> Perplexity:
    """Per-token and per-byte perplexity of a text (stride defaults to the window: independent chunks)."""
    ids = tokenizer.encode(text, bos=True)
    nll, tokens, windows = perplexity_of_ids(model, ids, window, stride or window, batch_size, tokenizer.pad_id,
                                             progress)
    return Perplexity(nll, tokens, len(text.encode("utf-8")), windows)
