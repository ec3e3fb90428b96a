"""Rewards for sampled answers (rejection sampling, PPO): a reward model that scores (dialog, answer) pairs in its own
tokenizer and chat format, and Llama 2's rule that combines a safety and a helpfulness reward model (§3.2.3).

Scores are the heads' raw outputs. Llama 2's reward models give a score in (0, 1), the sigmoid of that output (PPO
then takes its logit again before whitening), so the raw score is already the logit PPO works with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from llamakit.checkpoint import find_tokenizer, load_reward_model
from llamakit.checkpoint.io import read_json
from llamakit.checkpoint.peft import is_reward_adapter
from llamakit.data.preference import Prompt, prompt_and_answer
from llamakit.errors import CheckpointError, ConfigError, DataError
from llamakit.generate.chat import chat_style
from llamakit.model.lora import merge_lora
from llamakit.model.reward import ScoreHead, scores
from llamakit.tokenizer import Tokenizer, check_vocab, load_tokenizer
from llamakit.tokenizer.chat import ChatFormatError

SAFETY_THRESHOLD = 0.15  # Llama 2 §3.2.3: below this safety score (a probability) an answer counts as unsafe


def uses_safety(safe: torch.Tensor, is_safety: torch.Tensor | Sequence[bool],
                threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """Where Llama 2 takes the safety reward (B,): safety prompts, and answers whose sigmoid(safety score) is below
    the threshold."""
    is_safety = torch.as_tensor(is_safety, dtype=torch.bool, device=safe.device)
    return is_safety | (torch.sigmoid(safe.float()) < threshold)


def combined_reward(helpful: torch.Tensor, safe: torch.Tensor, is_safety: torch.Tensor | Sequence[bool],
                    threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """Llama 2's R_c (§3.2.3): R_s if the prompt is a safety prompt or sigmoid(R_s) < threshold, else R_h; raw
    scores (B,) in, the chosen raw scores (B,) out."""
    if not 0 < threshold < 1:
        raise ConfigError(f"safety threshold {threshold} is not a probability in (0, 1); Llama 2 uses 0.15")
    return torch.where(uses_safety(safe, is_safety, threshold), safe, helpful)


class RewardModel:
    """A reward model with its tokenizer and chat format; `score` rates answers to dialogs, a batch at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, source: str, batch_size: int = 16):
        if not isinstance(model.lm_head, ScoreHead):
            raise CheckpointError(f"{source} is a language model, not a reward model (its output is next-token "
                                  "logits); pass a model trained by `llamakit reward`")
        check_vocab(tokenizer, model.config.vocab_size, source)
        self.model, self.tokenizer, self.source, self.batch_size = model, tokenizer, source, batch_size
        self.style = chat_style(model, tokenizer)  # the format it was trained on (config.chat_format)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        # Names this model's scores apart from another's saved at the same path: a hash of its trained score head.
        head = model.lm_head.weight.detach().float().cpu().contiguous()
        self.fingerprint = hashlib.sha256(head.numpy().tobytes()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype=None,
             batch_size: int = 16) -> RewardModel:
        """The reward model in folder `path` (a whole one, or a LoRA reward adapter on the base it records), with
        the tokenizer saved beside it (or beside that base)."""
        model, tokenizer = load_reward(path, device, dtype)
        if tokenizer is None:
            raise CheckpointError(f"{path}: no tokenizer file beside the reward model; copy the tokenizer it was "
                                  "trained with into the folder (llamakit reward saves it there)")
        return cls(model, load_tokenizer(tokenizer), str(Path(path).resolve()), batch_size)

    def encode(self, dialog: list[dict], answer: str) -> list[int]:
        """dialog + answer as the reward model reads them, fitted to its context: the answer keeps its first tokens
        (at least half the window), the dialog its last."""
        try:
            before, reply = prompt_and_answer(self.tokenizer, dialog, answer, self.style)
        except ChatFormatError as e:
            raise DataError(f"an answer cannot be encoded for reward model {self.source}: {e}") from None
        window = self.model.config.max_seq_len
        reply = reply[:max(window - len(before), window // 2)]
        return before[max(0, len(before) + len(reply) - window):] + reply

    @torch.no_grad()
    def score(self, dialogs: Sequence[list[dict]], answers: Sequence[str]) -> torch.Tensor:
        """The score of each answer to its dialog (N,), fp32 on the CPU."""
        sequences = [self.encode(d, a) for d, a in zip(dialogs, answers)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: little padding
        out = torch.empty(len(sequences))
        device = self.model.embed_tokens.weight.device
        for b0 in tqdm(range(0, len(order), self.batch_size), desc="scoring", unit="batch", disable=None, leave=False):
            rows = order[b0:b0 + self.batch_size]
            T = max(len(sequences[i]) for i in rows)
            input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # right-padded
            for r, i in enumerate(rows):
                input_ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
            last = torch.tensor([len(sequences[i]) - 1 for i in rows])  # (R,)
            out[rows] = scores(self.model, input_ids.to(device), last.to(device)).float().cpu()  # (R,)
        return out


def load_reward(path: str | Path, device: torch.device | str = "cpu", dtype=None) -> tuple[torch.nn.Module, Path | None]:
    """A whole reward model from a folder, or from a LoRA reward adapter (`llamakit reward` with method lora) merged
    into the base its adapter_config.json names; and the tokenizer file beside it, else beside that base."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file() or not is_reward_adapter(path):
        return load_reward_model(path, dtype=dtype, device=device), find_tokenizer(path)
    base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise CheckpointError(f"{path}: a reward adapter whose base ({base!r}) is not found from here; merge it first: "
                              f"llamakit merge --base BASE --adapter {path} --output DIR")
    model = merge_lora(load_reward_model(base, adapter=path, dtype=dtype, device=device))  # one whole model to score
    return model, find_tokenizer(path) or find_tokenizer(base)


class Reward:
    """The reward of an answer: one reward model's score, or Llama 2's combination of a helpfulness and a safety
    reward model (combined_reward)."""

    def __init__(self, helpful: RewardModel, safe: RewardModel | None = None, threshold: float = SAFETY_THRESHOLD):
        if not 0 < threshold < 1:
            raise ConfigError(f"safety threshold {threshold} is not a probability in (0, 1); Llama 2 uses 0.15")
        self.helpful, self.safe, self.threshold = helpful, safe, threshold

    def __call__(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> torch.Tensor:
        """The reward of each answer to its prompt (N,)."""
        dialogs = [p.messages for p in prompts]
        helpful = self.helpful.score(dialogs, answers)
        if self.safe is None:
            return helpful
        return combined_reward(helpful, self.safe.score(dialogs, answers), [p.safety for p in prompts],
                               self.threshold)

    def identity(self) -> dict:
        """What a score depends on (the models' folders and score heads, the rule): scores with equal identities
        are comparable."""
        found = {"reward_model": self.helpful.source, "reward_head": self.helpful.fingerprint}
        if self.safe is not None:
            found |= {"safety_reward_model": self.safe.source, "safety_head": self.safe.fingerprint,
                      "safety_threshold": self.threshold}
        return found
