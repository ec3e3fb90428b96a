"""Rejection sampling (Llama 2 §3.2.3): K answers to each prompt from the policy, each scored by the reward, the best
kept as a fine-tuning example; later rounds pool the best answers of all earlier ones.

The output is JSON Lines that `llamakit finetune` reads as chat data (extra keys are ignored there):
    {"messages": [...the prompt..., {"role": "assistant", "content": best}], "score": best score,
     "candidates": [K answers], "scores": [their K scores], "samples": K, "kept": index of the best candidate
     (null when a pooled answer won), "pooled_from": file or null, "safety": bool, "chat_format": the policy's,
     "scored_by": the reward's identity}
A prompt's best is the first candidate with the highest score; an earlier round's answer (--pool) replaces it only
when its stored score is strictly higher. Pooled rows match prompts by their messages (role and content) and must
have been scored by the same reward model(s) (`scored_by`), or their scores would not be comparable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llamakit.data.preference import Prompt, encode_prompt, fit_prompt, read_prompts
from llamakit.data.sft_records import check_chat_row, read_records
from llamakit.errors import ConfigError, DataError
from llamakit.files import atomic_file
from llamakit.generate.chat import chat_style
from llamakit.generate.decode import generate
from llamakit.generate.sampling import SamplingParams
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import stop_ids_for
from llamakit.train.rewards import Reward

log = logging.getLogger(__name__)


@dataclass
class RejectionConfig:
    """One round of rejection sampling: where the prompts come from, how many answers each, where the best go."""

    prompts: str  # a prompt-only or preference file (data/preference.py's forms)
    output: str  # the JSON Lines file to write
    samples: int = 4  # K: answers drawn per prompt
    batch_size: int = 16  # sequences decoded together (a prompt's K copies count K)
    max_new_tokens: int = 256
    max_seq_len: int | None = None  # the policy's context window for prompt + answer; None: its trained one
    max_prompts: int | None = None  # only the first N usable prompts
    chat_format: str | None = None  # the policy's prompt format; None: the one it was tuned with, else the tokenizer's
    pool: Sequence[str] = ()  # earlier rounds' outputs whose answers compete with this round's
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; it must be at least 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts}; give a positive number, or None for every prompt")


@dataclass
class Pooled:
    """The best answer an earlier round kept for a prompt, with its score and the file it came from."""

    answer: str
    score: float
    source: str


class RejectionRound:
    """A round whose inputs are checked up front (output, prompts, pooled files), before any policy is loaded;
    `run` then samples, scores, keeps the best and writes the output."""

    def __init__(self, cfg: RejectionConfig, reward: Reward):
        self.cfg, self.reward = cfg, reward
        check_inputs(cfg)
        self.prompts, self.report = read_prompts(cfg.prompts)
        self.prompts = self.prompts[:cfg.max_prompts]
        self.pool = read_pool(cfg.pool, reward.identity())

    def run(self, policy: Transformer, tokenizer: Tokenizer, params: SamplingParams,
            generator: torch.Generator | None = None) -> dict:
        """Sample K answers per prompt, score them, keep the best (pooled), write cfg.output; return a summary."""
        cfg = self.cfg
        style = chat_style(policy, tokenizer, cfg.chat_format)
        if params.greedy and cfg.samples > 1:
            log.warning("temperature 0 is greedy: all %d samples of a prompt will be the same", cfg.samples)
        # The dialog as the policy is shown it (oldest exchanges dropped to leave room for an answer) is what the
        # output rows hold: fine-tuning on them trains on what was sampled, and later rounds match the same prompts.
        self.prompts = [fit_prompt(tokenizer, p, style, prompt_limit(policy, cfg)) for p in self.prompts]
        answers, stats = sample_answers(policy, tokenizer, self.prompts, style, cfg, params, generator)
        K = cfg.samples
        flat = self.reward([p for p in self.prompts for _ in range(K)], [a for row in answers for a in row])
        scores = flat.view(len(self.prompts), K).tolist()  # (N, K)
        identity = self.reward.identity()
        rows = [best_row(p, a, s, self.pool.get(prompt_key(p.messages)), style, identity)
                for p, a, s in zip(self.prompts, answers, scores)]
        write_rows(Path(cfg.output), rows)
        matched = sum(prompt_key(p.messages) in self.pool for p in self.prompts)
        summary = _summary(cfg, rows, scores, stats, self.report.skipped, matched)
        log.info("rejection sampling: %s", json.dumps(summary))
        return summary


def rejection_sample(policy: Transformer, tokenizer: Tokenizer, reward: Reward, cfg: RejectionConfig,
                     params: SamplingParams, generator: torch.Generator | None = None) -> dict:
    """One round of rejection sampling, written to cfg.output; returns its summary."""
    return RejectionRound(cfg, reward).run(policy, tokenizer, params, generator)


def check_inputs(cfg: RejectionConfig) -> None:
    """Fail fast (before any model is loaded) on a missing prompts or pooled file, or an output in the way."""
    for path, what in [(cfg.prompts, "prompts file"), *((p, "pooled file") for p in cfg.pool)]:
        if not Path(path).is_file():
            problem = "is not a file" if Path(path).exists() else "does not exist"
            raise DataError(f"{what} {path} {problem}; pass a .json, .jsonl or .parquet file")
    check_output(Path(cfg.output), cfg.overwrite)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output that would replace a file (unless overwrite) or a folder; create its parent folder."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the output a file name, e.g. {path / 'rejection.jsonl'}")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; choose another output file, or replace it with --force")
    path.parent.mkdir(parents=True, exist_ok=True)


def prompt_key(messages: Sequence[dict]) -> str:
    """What matches a prompt across files: its messages' roles and contents, in order."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def read_pool(paths: Sequence[str], identity: dict) -> dict[str, Pooled]:
    """The best kept answer per prompt over earlier rounds' outputs (the first file wins a tie)."""
    pool: dict[str, Pooled] = {}
    for path in paths:
        for index, row in enumerate(read_records(path)):
            where = f"{path}[{index}]"
            messages = check_chat_row(where, row, "messages")
            score = row.get("score")
            if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
                raise DataError(f"{where}: no numeric 'score'; pool only files written by llamakit rejection-sample")
            if row.get("scored_by") != identity:
                raise DataError(f"{where}: scored by {_models(row.get('scored_by'))}, but this round scores with "
                                f"{_models(identity)}; scores of different reward models are not comparable: pool "
                                "only files scored with the same --reward-model (and --safety-reward-model)")
            key, found = prompt_key(messages[:-1]), Pooled(messages[-1]["content"], float(score), str(path))
            if key not in pool or found.score > pool[key].score:
                pool[key] = found
    return pool


def _models(identity: object) -> str:
    """The reward model folders (and score-head hashes) an identity names, for errors."""
    if not isinstance(identity, dict):
        return "unknown reward models (the row has no 'scored_by')"
    names = [f"{identity.get(k)} (head {identity.get(h)})" for k, h in
             (("reward_model", "reward_head"), ("safety_reward_model", "safety_head")) if k in identity]
    rule = f", safety threshold {identity['safety_threshold']}" if "safety_threshold" in identity else ""
    return " + ".join(names) + rule


def prompt_limit(policy: Transformer, cfg: RejectionConfig) -> int:
    """Prompt ids that leave room for an answer, yet never more than half the window for it."""
    window = cfg.max_seq_len or policy.config.max_seq_len
    return window - min(cfg.max_new_tokens, window // 2)


def sample_answers(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[Prompt], style: str,
                   cfg: RejectionConfig, params: SamplingParams, generator: torch.Generator | None = None
                   ) -> tuple[list[list[str]], dict]:
    """K answers to each prompt (N lists of K), decoded cfg.batch_size sequences at a time on one KV cache."""
    window = cfg.max_seq_len or policy.config.max_seq_len
    encoded = [encode_prompt(tokenizer, p, style, prompt_limit(policy, cfg)) for p in prompts]
    rows = [ids for ids, _ in encoded for _ in range(cfg.samples)]  # each prompt K times, prompt-major
    budgets = [min(cfg.max_new_tokens, window - len(ids)) for ids in rows]
    row_params = sample_params(params, len(rows))
    cache = KVCache.for_model(policy, min(cfg.batch_size, len(rows)), max(len(r) + b for r, b in zip(rows, budgets)))
    stop_ids = stop_ids_for(tokenizer, style)
    tokens: list[list[int]] = []
    start = time.perf_counter()
    for b0 in tqdm(range(0, len(rows), cfg.batch_size), desc="sampling", unit="batch", disable=None, leave=False):
        end = b0 + cfg.batch_size
        done = generate(policy, None, rows[b0:end], budgets[b0:end], row_params[b0:end], stop_ids=stop_ids,
                        generator=generator, cache=cache)
        tokens += [c.tokens for c in done]
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t) for t in tokens]  # each a reply of its own (no space carried over from the prompt)
    K = cfg.samples
    stats = {"generated_tokens": sum(map(len, tokens)), "generation_seconds": seconds,
             "truncated_prompts": sum(truncated for _, truncated in encoded)}
    return [texts[i * K:(i + 1) * K] for i in range(len(prompts))], stats


def sample_params(params: SamplingParams, rows: int) -> list[SamplingParams]:
    """Each row's settings. With a seed, every row gets its own random stream drawn from it, so the samples are
    distinct draws and do not depend on the batch size; without one, rows share the caller's generator."""
    if params.seed is None:
        return [params] * rows
    seeds = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(params.seed))
    return [dataclasses.replace(params, seed=seed) for seed in seeds.tolist()]


def best_row(prompt: Prompt, answers: list[str], scores: list[float], pooled: Pooled | None, style: str,
             identity: dict) -> dict:
    """The fine-tuning row for one prompt: its best answer (the first highest-scoring one; a pooled answer only when
    strictly better) with every candidate's score."""
    kept = max(range(len(scores)), key=scores.__getitem__)  # max returns the first of equal scores
    answer, score, source = answers[kept], scores[kept], None
    if pooled is not None and pooled.score > score:
        answer, score, source, kept = pooled.answer, pooled.score, pooled.source, None
    return {"messages": [*prompt.messages, {"role": "assistant", "content": answer}], "score": score,
            "candidates": answers, "scores": scores, "samples": len(answers), "kept": kept, "pooled_from": source,
            "safety": prompt.safety, "chat_format": style, "scored_by": identity}


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSON Lines, written atomically: a crash leaves the old file (or none), never half of the new one."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _summary(cfg: RejectionConfig, rows: list[dict], scores: list[list[float]], stats: dict, skipped: dict,
             pool_matches: int) -> dict:
    """Counts and means of one round, for the log and the CLI."""
    every = [s for row in scores for s in row]
    seconds = stats["generation_seconds"]
    return {"prompts": len(rows), "samples": len(every), "samples_per_prompt": cfg.samples,
            "mean_best_score": sum(r["score"] for r in rows) / len(rows),
            "mean_sampled_best_score": sum(map(max, scores)) / len(scores), "mean_score": sum(every) / len(every),
            "pool_matches": pool_matches, "kept_from_pool": sum(r["pooled_from"] is not None for r in rows),
            "truncated_prompts": stats["truncated_prompts"], "skipped_rows": skipped,
            "generated_tokens": stats["generated_tokens"], "generation_seconds": round(seconds, 3),
            "tokens_per_second": stats["generated_tokens"] / seconds if seconds > 0 else 0.0, "output": cfg.output}
