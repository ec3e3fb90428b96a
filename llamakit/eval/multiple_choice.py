"""Multiple choice by log-likelihood: score every candidate, pick the most likely, report acc and acc_norm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llamakit.eval.scoring import encode_pair, score_pairs
from llamakit.eval.tasks import MCExample
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

ACC_NORM = ("acc_norm picks the highest sum of continuation token log-probabilities divided by the length in "
            "characters of the candidate's answer, the space before it excluded (lm-evaluation-harness 0.4's rule: "
            "len() of its choice string; WinoGrande's choice is the sentence up to the blank with the option)")


@dataclass
class TaskResult:
    """A finished task: headline metrics, the settings that produced them, and one record per example."""

    name: str
    metrics: dict[str, float | int]
    settings: dict[str, object]
    records: list[dict] = field(default_factory=list)
    details: dict[str, dict] = field(default_factory=dict)  # e.g. MMLU's per-subject metrics


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def stderr_of_mean(hits: Sequence[float]) -> float:
    """Standard error of a mean of 0/1 outcomes (sample variance), 0 for fewer than two."""
    n = len(hits)
    if n < 2:
        return 0.0
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def encode_choices(tokenizer: Tokenizer, examples: Sequence[MCExample]) -> list[tuple[list[int], list[int]]]:
    """Token ids of every candidate pair, in order (a context shared by the candidates is encoded once)."""
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    return [cache.setdefault(pair, encode_pair(tokenizer, *pair)) for ex in examples for pair in ex.choices]


def score_examples(model: Transformer, tokenizer: Tokenizer, examples: Sequence[MCExample], window: int,
                   batch_size: int, progress: bool = False, desc: str = "scoring") -> list[dict]:
    """One record per example: each candidate's log-probability, the picks by acc and acc_norm, and the gold."""
    scores = score_pairs(model, encode_choices(tokenizer, examples), window, batch_size,
                         pad_id=tokenizer.pad_id, progress=progress, desc=desc)
    records, at = [], 0
    for ex in examples:
        mine, at = scores[at:at + len(ex.choices)], at + len(ex.choices)
        logprobs = [s.logprob for s in mine]
        n_chars = [len(answer) for answer in ex.answers]
        normed = [lp / n if n else -math.inf for lp, n in zip(logprobs, n_chars)]  # an empty answer: lm-eval's -inf
        pred, pred_norm = argmax(logprobs), argmax(normed)
        records.append({"id": ex.id, "gold": ex.gold, "pred": pred, "pred_norm": pred_norm,
                        "acc": int(pred == ex.gold), "acc_norm": int(pred_norm == ex.gold),
                        "logprobs": logprobs, "n_chars": n_chars, "n_tokens": [s.n_tokens for s in mine],
                        "is_greedy": [s.is_greedy for s in mine], "truncated_tokens": max(s.truncated for s in mine)})
    return records


def accuracy(records: Sequence[dict]) -> dict[str, float | int]:
    """acc and acc_norm (with standard errors) over records, and how many examples lost context tokens."""
    acc, acc_norm = [r["acc"] for r in records], [r["acc_norm"] for r in records]
    n = max(len(records), 1)
    return {"acc": sum(acc) / n, "acc_stderr": stderr_of_mean(acc), "acc_norm": sum(acc_norm) / n,
            "acc_norm_stderr": stderr_of_mean(acc_norm), "n": len(records),
            "truncated_examples": sum(r["truncated_tokens"] > 0 for r in records)}
