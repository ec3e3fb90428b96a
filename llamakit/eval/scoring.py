"""Log-likelihood of continuations given contexts, in batches, and greedy answers: the two primitives of evaluation.

Tokenisation (the same as lm-evaluation-harness): the context and context + continuation are each encoded
whole, with BOS first, and the continuation's tokens are those of the whole past the context's token
count. Encoding the continuation alone would give SentencePiece's word-start marker a space the text
does not have. Trailing spaces of a context move to the start of its continuation first.

A context that does not fit the window loses its oldest tokens (counted in `Score.truncated`); a
continuation longer than the window is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llamakit.errors import EvalError
from llamakit.generate import SamplingParams, generate
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer

TOKENIZATION = ("context and context+continuation encoded whole with BOS; the continuation is the tokens past "
                "the context's count; contexts longer than the window lose their oldest tokens")


@dataclass(frozen=True)
class Score:
    """The log-probability of one continuation and whether greedy decoding would have produced it."""

    logprob: float
    is_greedy: bool
    n_tokens: int  # continuation tokens scored
    truncated: int  # context tokens dropped from the left to fit the window


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (BOS first) and continuation ids, split from the encoding of the whole text."""
    if not continuation:
        raise EvalError("an empty continuation cannot be scored; every choice needs some text")
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    split = min(len(tokenizer.encode(context, bos=True)), len(whole) - 1)
    return whole[:split], whole[split:]


def fit_window(context: Sequence[int], continuation: Sequence[int], window: int) -> tuple[list[int], int]:
    """The model's input (context + continuation minus its last token, oldest tokens cut to fit) and the cut."""
    if len(continuation) > window:
        raise EvalError(f"a continuation of {len(continuation)} tokens does not fit the {window}-token window; "
                        "shorten it, or evaluate with a larger --max-seq-len")
    tokens = list(context) + list(continuation)
    cut = max(0, len(tokens) - 1 - window)
    return tokens[cut:-1], cut


@contextlib.contextmanager
def logits_only_at(model: Transformer, positions: torch.Tensor) -> Iterator[None]:
    """Within this block the model returns logits (B, K, V) only at positions (B, K) of each row.

    The output projection is the largest matrix of a small model; continuations are a few tokens of a
    long context, so projecting only them saves most of the work. The final norm acts per position, so
    selecting its input rows (a forward pre-hook, the model itself unchanged) selects the same logits.
    """
    def select(_module, args):
        h = args[0]  # (B, T, dim)
        return (h.gather(1, positions[..., None].expand(-1, -1, h.size(-1))),)  # (B, K, dim)

    handle = model.norm.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def score_pairs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], window: int,
                batch_size: int = 16, pad_id: int = 0, progress: bool = False, desc: str = "scoring") -> list[Score]:
    """Score each (context ids, continuation ids): one forward per batch of rows sorted by length.

    Pairs whose model input is identical (MMLU's " A".." D" after one prompt) share one row.
    """
    rows: dict[tuple[tuple[int, ...], int], int] = {}  # (input ids, continuation length) -> row
    row_of, cuts = [], []
    for context, continuation in pairs:
        inputs, cut = fit_window(context, continuation, window)
        row_of.append(rows.setdefault((tuple(inputs), len(continuation)), len(rows)))
        cuts.append(cut)
    keys = list(rows)
    order = sorted(range(len(keys)), key=lambda r: -len(keys[r][0]))  # longest first: memory peaks at once
    members: dict[int, list[int]] = {}
    for i, r in enumerate(row_of):
        members.setdefault(r, []).append(i)
    results: list[Score | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        batch = order[start:start + batch_size]
        requests = [i for r in batch for i in members[r]]
        for i, (lp, greedy) in zip(requests, _score_batch(model, [keys[r] for r in batch], batch,
                                                          [(row_of[i], pairs[i][1]) for i in requests], pad_id)):
            results[i] = Score(lp, greedy, len(pairs[i][1]), cuts[i])
    return results  # type: ignore[return-value]


def _score_batch(model: Transformer, keys, batch: list[int], requests: list[tuple[int, Sequence[int]]],
                 pad_id: int) -> list[tuple[float, bool]]:
    """(sum of logprobs, all tokens greedy) of each request's continuation; its row is one of `batch`."""
    device = model.embed_tokens.weight.device
    lengths = [len(inputs) for inputs, _ in keys]
    K = max(n for _, n in keys)
    tokens = torch.full((len(keys), max(lengths)), pad_id, dtype=torch.long)
    positions = torch.empty(len(keys), K, dtype=torch.long)
    for b, (inputs, n) in enumerate(keys):
        tokens[b, :len(inputs)] = torch.tensor(inputs)  # right padding: a causal model never sees it
        positions[b] = (torch.arange(K) + len(inputs) - n).clamp(max=len(inputs) - 1)  # the last n positions
    with logits_only_at(model, positions.to(device)):
        logprobs = torch.log_softmax(model(tokens.to(device)), dim=-1)  # (B, K, V)
    slot = {r: b for b, r in enumerate(batch)}
    rows = torch.tensor([slot[r] for r, _ in requests], device=device)  # (R,)
    targets = torch.zeros(len(requests), K, dtype=torch.long)
    valid = torch.zeros(len(requests), K, dtype=torch.bool)
    for j, (_, continuation) in enumerate(requests):
        targets[j, :len(continuation)] = torch.tensor(continuation)
        valid[j, :len(continuation)] = True
    targets, valid = targets.to(device), valid.to(device)
    picked = logprobs[rows].gather(-1, targets[..., None]).squeeze(-1)  # (R, K)
    greedy = (logprobs[rows].argmax(-1) == targets) | ~valid  # (R, K)
    sums = (picked * valid).sum(-1)  # (R,)
    return list(zip(sums.tolist(), greedy.all(-1).tolist()))


def greedy_answers(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], window: int,
                   max_new_tokens: int = 32, stop: Sequence[str] = ("\n",), batch_size: int = 16,
                   progress: bool = False, desc: str = "generating",
                   params: Sequence[SamplingParams] | None = None) -> list[tuple[str, int]]:
    """Greedy continuation of each prompt up to a stop string; (text, prompt tokens cut to fit the window).

    `params` (one per prompt) samples instead; give each its own seed and the text does not depend on batching.
    """
    if max_new_tokens >= window:
        raise EvalError(f"{max_new_tokens} new tokens leave no room for a prompt in the {window}-token window")
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, bos=True)
        cut = max(0, len(ids) - (window - max_new_tokens))
        encoded.append((ids[cut:], cut))
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
    answers: list[tuple[str, int] | None] = [None] * len(prompts)
    chosen = list(params) if params is not None else [SamplingParams(temperature=0)] * len(prompts)
    cache = KVCache.for_model(model, min(batch_size, len(prompts)) or 1, window)  # shared by every batch
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        batch = order[start:start + batch_size]
        done = generate(model, tokenizer, [encoded[i][0] for i in batch], max_new_tokens, [chosen[i] for i in batch],
                        stop_strings=stop, cache=cache)
        for i, completion in zip(batch, done):
            answers[i] = (completion.text, encoded[i][1])
    return answers  # type: ignore[return-value]
