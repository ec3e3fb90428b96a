"""`llamakit ppo`: RLHF with PPO against a reward model (ColossalChat's third stage, Llama 2 §3.2.3), or against a
verifiable reward function, on the one training loop.

The trained model is an ActorCritic: the policy (full, or LoRA on the SFT model) and a value model initialised from
the reward model (trained the same way: fully, or LoRA plus its score head), under one optimizer. Rollouts
(train/rollout.py) are sampled with the inference engine; the reference is a frozen copy of the starting policy,
or, for LoRA, the policy with its adapter disabled (no memory).
final/ holds the policy alone: a model folder (full) or a PEFT adapter (lora); step-N/ adds value/ for resuming (for
lora, a PEFT sequence-classification adapter of the reward model).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from llamakit.checkpoint import load_model
from llamakit.data import TokenShards
from llamakit.data.preference import encode_prompt, read_prompts
from llamakit.errors import ConfigError
from llamakit.generate.chat import chat_style
from llamakit.model.lora import apply_lora
from llamakit.model.reward import apply_reward_head
from llamakit.tokenizer import check_vocab
from llamakit.tokenizer.chat import stop_ids_for
from llamakit.train.batches import EpochOrder, PackedWindows
from llamakit.train.config import CheckpointSection, RunConfig
from llamakit.train.finetune import BaseModelSection, MethodSection, apply_method, base_tokenizer, check_method
from llamakit.train.loop import LoopData
from llamakit.train.metrics import flops_per_token
from llamakit.train.parallel import Processes
from llamakit.train.rewards import Reward, RewardModel, load_reward
from llamakit.train.rl import KL_ESTIMATORS, ActorCritic, PPOObjective
from llamakit.train.rollout import RolloutSettings, RolloutSteps
from llamakit.train.runner import Job, run

log = logging.getLogger(__name__)


@dataclass
class PromptDataSection:
    """The prompts to answer (any form data/preference.py reads) and the sequence budget."""

    path: str = "data/prompts.jsonl"
    chat_format: str | None = None  # llama2 | llama3 | alpaca | None: the policy's, else the tokenizer's
    seq_len: int = 512  # prompt + response ids; a prompt keeps its last seq_len - ppo.max_new_tokens ids
    max_examples: int | None = None


@dataclass
class PPOConfig:
    """The reward, the rollouts and PPO's losses."""

    reward_model: str | None = None  # a `llamakit reward` model folder
    safety_reward_model: str | None = None  # Llama 2: with it, reward_model is the helpfulness model
    safety_threshold: float = 0.15  # Llama 2: the safety score decides when σ(safety) < this, or a safety prompt
    reward_function: str | None = None  # "module:function" (prompts, responses) -> scores: a verifiable reward
    value_model: str | None = None  # None: initialised from reward_model (else the policy with a new head)
    rollout_batch_size: int = 64  # prompts per rollout, over all processes
    epochs: int = 4  # PPO epochs over each rollout (train.batch_size rows per optimizer step)
    max_new_tokens: int = 128
    generation_batch_size: int = 64  # responses sampled together on each process (the KV cache's slots)
    temperature: float = 1.0
    kl_coef: float = 0.01  # β: Llama 2 0.01 (7B/13B), 0.005 (34B/70B)
    kl_estimator: str = "k1"  # k1: log π − log π_ref; k3: the non-negative, lower-variance one
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_scores: bool = False  # Llama 2: whiten(logit(R_c)) over each rollout
    no_eos_score: float | None = None  # a response that never ends scores this instead (torchtune: -3)
    ptx_path: str | None = None  # prepared pretraining shards (`llamakit prepare`) for ColossalChat's ptx loss
    ptx_coef: float = 0.0

    def __post_init__(self):
        if self.safety_reward_model and not self.reward_model:
            raise ConfigError("ppo.safety_reward_model pairs with ppo.reward_model (the helpfulness model)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"ppo.kl_estimator={self.kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        for name in ("rollout_batch_size", "epochs", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"ppo.temperature={self.temperature} must be > 0: PPO samples from the policy")
        if self.ptx_coef and not self.ptx_path:
            raise ConfigError("ppo.ptx_coef needs ppo.ptx_path (prepared pretraining shards)")


@dataclass
class PPOCheckpoints(CheckpointSection):
    out_dir: str = "runs/ppo"


@dataclass
class PPORunConfig(RunConfig):
    command: ClassVar[str] = "ppo"
    checkpoint: PPOCheckpoints = field(default_factory=PPOCheckpoints)
    model: BaseModelSection = field(default_factory=BaseModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: PromptDataSection = field(default_factory=PromptDataSection)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        p, t = self.ppo, self.train
        if (p.reward_model is None) == (p.reward_function is None):
            raise ConfigError("give exactly one of ppo.reward_model (a reward model folder) and ppo.reward_function "
                              "(module:function)")
        check_method(self.method, ("full", "lora"), "PPO trains")
        if p.rollout_batch_size % t.batch_size:
            raise ConfigError(f"ppo.rollout_batch_size={p.rollout_batch_size} must be a multiple of train.batch_size="
                              f"{t.batch_size} (the minibatch of each optimizer step)")
        steps = p.epochs * p.rollout_batch_size // t.batch_size
        for name, value in (("train.max_steps", t.max_steps), ("checkpoint.every", self.checkpoint.every)):
            if value % steps:
                raise ConfigError(f"{name}={value} must be a multiple of the {steps} optimizer steps of each rollout "
                                  "(ppo.epochs × ppo.rollout_batch_size / train.batch_size): a run stops and resumes "
                                  "between rollouts")
        if t.parallel == "fsdp":
            raise ConfigError("PPO samples rollouts of different lengths on each process, which FSDP's collective "
                              "forwards cannot; set train.parallel to ddp")
        if self.data.seq_len <= p.max_new_tokens:
            raise ConfigError(f"data.seq_len={self.data.seq_len} leaves no room for a prompt before "
                              f"ppo.max_new_tokens={p.max_new_tokens}; raise data.seq_len")


def ppo(cfg: PPORunConfig, resume: bool = False) -> Path:
    """Train with PPO and return final/: the policy as a model folder (full) or a PEFT adapter folder (lora)."""
    return run(cfg, build_job, resume)


def build_job(cfg: PPORunConfig, procs: Processes) -> Job:
    p = cfg.ppo
    tokenizer = base_tokenizer(cfg.model)
    policy = load_model(cfg.model.path, dtype=cfg.model.dtype, device=procs.device)
    check_vocab(tokenizer, policy.config.vocab_size, str(cfg.model.path))
    style = chat_style(policy, tokenizer, cfg.data.chat_format)
    policy.config = policy.config.replace(chat_format=style)
    prompts, report = read_prompts(cfg.data.path)
    prompts = prompts[:cfg.data.max_examples]
    if len(prompts) < p.rollout_batch_size:
        log.info("%d prompts for rollouts of %d: prompts repeat within a rollout", len(prompts), p.rollout_batch_size)
    encoded = [encode_prompt(tokenizer, q, style, cfg.data.seq_len - p.max_new_tokens) for q in prompts]
    log.info("prompts: %d read, %d used, %d truncated, skipped %s", report.rows, len(prompts),
             sum(t for _, t in encoded), report.skipped)
    reference = None
    if cfg.method.name == "full":  # LoRA: the policy with its adapter disabled is the reference
        reference = load_model(cfg.model.path, dtype=cfg.model.dtype, device=procs.device).requires_grad_(False)
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices, a new value head: the same on every process and run
    adapter = apply_method(policy, cfg.method)
    model = ActorCritic(policy, _value_model(cfg, procs))
    aux, scorer = _reward(cfg, procs)
    settings = RolloutSettings(
        rollout_batch_size=p.rollout_batch_size, batch_size=cfg.train.batch_size,
        micro_batch_size=cfg.train.micro_batch_size, epochs=p.epochs, max_new_tokens=p.max_new_tokens,
        generation_batch_size=p.generation_batch_size,
        temperature=p.temperature, kl_coef=p.kl_coef, kl_estimator=p.kl_estimator, gamma=p.gamma, lam=p.lam,
        whiten_scores=p.whiten_scores, no_eos_score=p.no_eos_score, seed=cfg.train.seed)
    steps = RolloutSteps(model, reference, scorer, prompts, [ids for ids, _ in encoded],
                         stop_ids_for(tokenizer, style), tokenizer.pad_id, settings, procs,
                         lambda ids: tokenizer.decode(ids), _ptx(cfg))
    if reference is not None:
        aux["reference"] = reference
    objective = PPOObjective(p.clip, p.value_clip, p.vf_coef, p.temperature, p.ptx_coef)
    # Policy and value model both train: 2 x 6N per token, or 2 x 4N with frozen LoRA bases (rollouts not counted).
    flops = flops_per_token(policy.config, cfg.data.seq_len) * (2 if adapter is None else 4 / 3)
    return Job(model.train(), objective, LoopData(steps.train_step, [], steps.step_metrics), tokenizer, flops,
               adapter=adapter, base=str(cfg.model.path), aux=aux)


def _value_model(cfg: PPORunConfig, procs: Processes) -> torch.nn.Module:
    """The value model: the reward model's weights (InstructGPT, Llama 2), else the policy's with a new scalar head
    that starts at zero; trained like the policy (fully, or LoRA plus the head)."""
    path = cfg.ppo.value_model or cfg.ppo.reward_model
    if path is not None:
        value, _ = load_reward(path, procs.device, torch.float32)
    else:  # a zero head: values start at 0, so early advantages are the rewards themselves, not a random head's noise
        value = apply_reward_head(load_model(cfg.model.path, dtype=torch.float32, device=procs.device))
        torch.nn.init.zeros_(value.lm_head.weight)
    if cfg.method.name == "lora":  # the same LoRA as the policy, and the head: the value model costs no more
        apply_lora(value, cfg.method.lora)
        value.lm_head.requires_grad_(True)
        return value.train()
    return value.train().requires_grad_(True)


def _reward(cfg: PPORunConfig, procs: Processes) -> tuple[dict[str, torch.nn.Module], object]:
    """The frozen models the reward reads (for Job.aux) and the scorer: reward model(s), or a reward function."""
    p = cfg.ppo
    if p.reward_function is not None:
        return {}, _import_function(p.reward_function)
    batch = cfg.train.micro_batch_size
    helpful = RewardModel.load(p.reward_model, procs.device, batch_size=batch)
    safe = RewardModel.load(p.safety_reward_model, procs.device, batch_size=batch) if p.safety_reward_model else None
    models = {"reward": helpful.model} | ({"safety_reward": safe.model} if safe else {})
    reward = Reward(helpful, safe, p.safety_threshold)
    return models, lambda prompts, texts: reward(prompts, texts)


def _import_function(spec: str):
    """module:function, imported; it maps (prompt dialogs, response texts) to one score each."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"ppo.reward_function={spec!r} cannot be imported ({e}); give module:function with the "
                          "module on PYTHONPATH") from None

    def scorer(prompts, texts):
        try:
            scores = torch.as_tensor(fn([q.messages for q in prompts], texts), dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"ppo.reward_function={spec!r} did not return numbers ({e}); return one float per "
                              "response") from None
        if scores.numel() != len(texts) or not scores.isfinite().all():
            raise ConfigError(f"ppo.reward_function={spec!r} returned {scores.numel()} scores for {len(texts)} "
                              "responses (or a NaN/inf); return one finite float per response")
        return scores

    return scorer


def _ptx(cfg: PPORunConfig):
    """(first, count) -> that many pretraining windows, in a seeded order: ColossalChat's ptx batches."""
    if not cfg.ppo.ptx_path:
        return None
    windows = PackedWindows(TokenShards(cfg.ppo.ptx_path, "train"), cfg.data.seq_len)
    order = EpochOrder(windows.num_samples, cfg.train.seed)
    return lambda first, count: windows.batch([order(first + i) for i in range(count)])
