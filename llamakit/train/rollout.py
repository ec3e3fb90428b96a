"""PPO's data: rollouts made with the inference engine, turned into minibatches for the one loop.

Rollout k feeds optimizer steps k·S .. k·S + S − 1 (S = epochs × rollout_batch_size / batch_size) and is made when
the first of them asks for its batches, with the policy as those steps find it. Each process samples its share
of the rollout's prompts (batched on one KV cache, each prompt with its own seeded random stream), scores them
with the old policy, the value model, the reference and the reward; the shares are then gathered, so every
process computes the same rewards, advantages and minibatches, and 2 processes train exactly as 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llamakit.data.preference import Prompt
from llamakit.generate.engine import Decoder
from llamakit.generate.sampling import SamplingParams
from llamakit.model import KVCache, Transformer
from llamakit.model.lora import disable_lora
from llamakit.train.batches import IGNORE_INDEX, EpochOrder
from llamakit.train.parallel import Processes
from llamakit.train.rl import ActorCritic, gae, kl_estimate, masked_whiten, token_logprobs

Batch = dict[str, torch.Tensor]
Scorer = Callable[[list[Prompt], list[str]], torch.Tensor]  # prompts, response texts -> raw scores (R,)


@dataclass
class RolloutSettings:
    rollout_batch_size: int  # prompts per rollout, over all processes
    batch_size: int  # rows per optimizer step (a PPO minibatch), over all processes
    micro_batch_size: int
    epochs: int
    max_new_tokens: int
    generation_batch_size: int  # responses sampled together on one process
    temperature: float
    kl_coef: float
    kl_estimator: str
    gamma: float
    lam: float
    whiten_scores: bool
    no_eos_score: float | None
    seed: int

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * (self.rollout_batch_size // self.batch_size)


@dataclass
class Rollout:
    """One rollout batch, in prompt order: each row's ids (prompt + response) and per-response-token tensors."""

    ids: list[list[int]]
    prompt_lens: list[int]
    old_logps: list[torch.Tensor]
    old_values: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]
    stats: dict[str, float]

    def batch(self, indices: Sequence[int], pad_id: int) -> Batch:
        return response_batch([self.ids[i] for i in indices], [self.prompt_lens[i] for i in indices], pad_id, {
            "old_logps": [self.old_logps[i] for i in indices], "old_values": [self.old_values[i] for i in indices],
            "advantages": [self.advantages[i] for i in indices], "returns": [self.returns[i] for i in indices]})


def response_batch(ids: list[list[int]], prompt_lens: list[int], pad_id: int,
                   per_token: dict[str, list[torch.Tensor]] | None = None) -> Batch:
    """Right-padded input_ids and labels (B, T) (labels: the response tokens, IGNORE_INDEX elsewhere) and each
    per-token tensor placed at its token's label position."""
    T = max(len(s) for s in ids) - 1
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels}
    for name in per_token or {}:
        batch[name] = torch.zeros(len(ids), T)
    for r, (seq, p) in enumerate(zip(ids, prompt_lens)):
        seq = torch.tensor(seq)
        input_ids[r, :len(seq) - 1] = seq[:-1]
        labels[r, p - 1:len(seq) - 1] = seq[p:]
        for name, values in (per_token or {}).items():
            batch[name][r, p - 1:len(seq) - 1] = values[r]
    return batch


@torch.no_grad()
def sample_responses(policy: Transformer, cache: KVCache, prompts: list[list[int]], params: list[SamplingParams],
                     max_new_tokens: int, stop_ids: frozenset[int]) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's response, sampled together on the engine (a finished row leaves the batch at once), with the
    stop id that ended it; and whether it ended before max_new_tokens."""
    decoder = Decoder(policy, cache)
    out: dict[object, list[int]] = {}
    try:
        requests = decoder.add(prompts, params, [max_new_tokens] * len(prompts))
        out = {r: [] for r in requests}
        while decoder.live:
            for token in decoder.step():
                out[token.request].append(token.id)
                if token.id in stop_ids or len(out[token.request]) == max_new_tokens:
                    decoder.finish(token.request)
    finally:
        decoder.close()
    responses = [out[r] for r in requests]
    return responses, [bool(r) and r[-1] in stop_ids for r in responses]


class RolloutSteps:
    """LoopData for PPO: each optimizer step's micro-batches (train_step) and its rollout's statistics."""

    def __init__(self, actor_critic: ActorCritic, reference: Transformer | None, scorer: Scorer,
                 prompts: list[Prompt], prompt_ids: list[list[int]], stop_ids: frozenset[int], pad_id: int,
                 settings: RolloutSettings, procs: Processes, decode: Callable[[list[int]], str],
                 ptx: Callable[[int, int], Batch] | None = None):
        self.model, self.reference, self.scorer = actor_critic, reference, scorer
        self.prompts, self.prompt_ids, self.stop_ids, self.pad_id = prompts, prompt_ids, stop_ids, pad_id
        self.s, self.procs, self.decode, self.ptx = settings, procs, decode, ptx
        self.order = EpochOrder(len(prompts), settings.seed)
        self.current: tuple[int, Rollout] | None = None

    def train_step(self, step: int) -> list[Batch]:
        rollout = self.rollout(step // self.s.steps_per_rollout)
        per_epoch = self.s.rollout_batch_size // self.s.batch_size
        epoch, minibatch = divmod(step % self.s.steps_per_rollout, per_epoch)
        k = step // self.s.steps_per_rollout
        order = np.random.default_rng([self.s.seed, k, epoch]).permutation(self.s.rollout_batch_size)
        rows = order[minibatch * self.s.batch_size:(minibatch + 1) * self.s.batch_size]
        per_rank = self.s.batch_size // self.procs.world_size
        mine = rows[self.procs.rank * per_rank:(self.procs.rank + 1) * per_rank].tolist()
        m = self.s.micro_batch_size
        batches = [rollout.batch(mine[i:i + m], self.pad_id) for i in range(0, per_rank, m)]
        if self.ptx is not None:
            first = step * self.s.batch_size + self.procs.rank * per_rank
            for u, batch in enumerate(batches):
                ptx = self.ptx(first + u * m, m)
                batch.update(ptx_ids=ptx["input_ids"], ptx_labels=ptx["labels"])
        return batches

    def step_metrics(self, step: int) -> dict[str, float]:
        return self.rollout(step // self.s.steps_per_rollout).stats

    def rollout(self, k: int) -> Rollout:
        """Rollout k, made now unless it is the one in hand."""
        if self.current is None or self.current[0] != k:
            self.current = k, self._make(k)
        return self.current[1]

    @torch.no_grad()
    def _make(self, k: int) -> Rollout:
        R, W, rank = self.s.rollout_batch_size, self.procs.world_size, self.procs.rank
        positions = list(range(rank, R, W))  # this process's rows of the rollout
        chosen = [self.order(k * R + i) for i in positions]
        start = time.perf_counter()
        responses, ended = self._sample([self.prompt_ids[p] for p in chosen],
                                        [self._seed(k, i) for i in positions])
        seconds = time.perf_counter() - start
        ids = [self.prompt_ids[p] + r for p, r in zip(chosen, responses)]
        prompt_lens = [len(self.prompt_ids[p]) for p in chosen]
        logps, ref_logps, values = self._score_tokens(ids, prompt_lens)
        texts = [self.decode(r[:-1] if e else r) for r, e in zip(responses, ended)]
        scores = self.scorer([self.prompts[p] for p in chosen], texts)
        mine = [dict(position=i, ids=s, prompt_len=p, logps=a, ref_logps=b, values=v, score=float(c), ended=e)
                for i, s, p, a, b, v, c, e in zip(positions, ids, prompt_lens, logps, ref_logps, values,
                                                  scores.tolist(), ended)]
        rows, timing = self._gather(mine, (sum(len(r) for r in responses), seconds))
        return self._advantages(sorted(rows, key=lambda row: row["position"]), timing)

    def _seed(self, k: int, position: int) -> int:
        """Row `position` of rollout k samples from its own stream: the same whichever process samples it."""
        return int(np.random.default_rng([self.s.seed, k, position]).integers(2**62))

    def _sample(self, prompts: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool]]:
        """Responses sampled generation_batch_size at a time on one KV cache, freed afterwards: training needs
        the memory."""
        policy, n = self.model.policy, self.s.generation_batch_size
        cache = KVCache.for_model(policy, min(n, len(prompts)), max(len(p) for p in prompts) + self.s.max_new_tokens)
        responses, ended = [], []
        for i in range(0, len(prompts), n):
            params = [SamplingParams(temperature=self.s.temperature, top_p=1.0, seed=seed) for seed in seeds[i:i + n]]
            r, e = sample_responses(policy, cache, prompts[i:i + n], params, self.s.max_new_tokens, self.stop_ids)
            responses += r
            ended += e
        return responses, ended

    def _score_tokens(self, ids: list[list[int]], prompt_lens: list[int]):
        """The rollout policy's and the reference's log p of each response token, and the value model's values."""
        logps, ref_logps, values = [], [], []
        m = self.s.micro_batch_size
        for i in range(0, len(ids), m):
            batch = response_batch(ids[i:i + m], prompt_lens[i:i + m], self.pad_id)
            tokens, labels = batch["input_ids"].to(self.procs.device), batch["labels"].to(self.procs.device)
            logits, value, _ = self.model(tokens)
            lp, _ = token_logprobs(logits, labels, self.s.temperature)
            if self.reference is None:  # a LoRA policy: its base is the reference
                with disable_lora(self.model.policy):
                    ref, _ = token_logprobs(self.model.policy(tokens), labels, self.s.temperature)
            else:
                ref, _ = token_logprobs(self.reference(tokens), labels, self.s.temperature)
            for r, (seq, p) in enumerate(zip(ids[i:i + m], prompt_lens[i:i + m])):
                span = slice(p - 1, len(seq) - 1)  # the positions that predict the response tokens
                logps.append(lp[r, span].cpu())
                ref_logps.append(ref[r, span].cpu())
                values.append(value[r, span].cpu())
        return logps, ref_logps, values

    def _gather(self, mine: list[dict], timing: tuple[int, float]) -> tuple[list[dict], tuple[int, float]]:
        """Every process's rows (and generation tokens, seconds): a rollout is computed on whole batches."""
        if self.procs.world_size == 1:
            return mine, timing
        shares: list = [None] * self.procs.world_size
        dist.all_gather_object(shares, (mine, timing))
        rows = [row for share, _ in shares for row in share]
        return rows, (sum(t for _, (t, _) in shares), max(s for _, (_, s) in shares))

    def _advantages(self, rows: list[dict], timing: tuple[int, float]) -> Rollout:
        """Per-token rewards (the KL penalty, the score at the last token), GAE, whitened advantages."""
        lengths = torch.tensor([len(r["logps"]) for r in rows])
        L = int(lengths.max())
        mask = (torch.arange(L)[None] < lengths[:, None]).float()  # (R, L)

        def padded(name: str) -> torch.Tensor:
            out = torch.zeros(len(rows), L)
            for i, r in enumerate(rows):
                out[i, :len(r[name])] = r[name]
            return out  # (R, L)

        logps, ref_logps, values = padded("logps"), padded("ref_logps"), padded("values")
        raw = torch.tensor([r["score"] for r in rows])
        ended = torch.tensor([r["ended"] for r in rows])
        scores = raw.clone()
        if self.s.no_eos_score is not None:  # a response that never ends gets this score instead (torchtune's)
            scores[~ended] = self.s.no_eos_score
        if self.s.whiten_scores:  # Llama 2: whiten(logit(R)); our heads output logits, so logit(σ(s)) = s
            scores = masked_whiten(scores, torch.ones_like(scores))
        kl = kl_estimate(logps, ref_logps, self.s.kl_estimator) * mask
        rewards = -self.s.kl_coef * kl
        rewards[torch.arange(len(rows)), lengths - 1] += scores
        advantages, returns = gae(rewards, values, mask, self.s.gamma, self.s.lam)
        advantages = masked_whiten(advantages, mask)
        tokens, seconds = timing
        stats = {"reward": raw.mean().item(), "score": scores.mean().item(),
                 "kl": ((logps - ref_logps) * mask).sum(1).mean().item(), "response_length": lengths.float().mean().item(),
                 "ended": ended.float().mean().item(), "rollout_tokens_per_s": tokens / max(seconds, 1e-9)}
        unpad = lambda t: [t[i, :n] for i, n in enumerate(lengths.tolist())]  # noqa: E731
        return Rollout([r["ids"] for r in rows], [r["prompt_len"] for r in rows], unpad(logps), unpad(values),
                       unpad(advantages), unpad(returns), stats)
