"""A reward model from a language model, by module swap: the output head becomes one score per position.

The score of a sequence is the head's output at its last token (Llama 2 §3.2.2, InstructGPT). Swapped in as a
registered transform, so a trained reward model saved in the llamakit format records it and loads as one. A LoRA
reward model trains the new head fully beside the adapter and saves it with the adapter, as PEFT's sequence
classification does (checkpoint/peft.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llamakit.model.llama import Transformer
from llamakit.model.transforms import Transform, apply_transforms, register


class ScoreHead(nn.Linear):
    """Linear(dim, 1) in fp32 whatever the model's dtype: a reward is one number, worth keeping exact."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h.to(self.weight.dtype))  # (B, T, 1)


@register
@dataclass
class RewardHead(Transform):
    """Replace the output head (tied or not) by a ScoreHead; the model then returns (B, T, 1) scores."""

    name: ClassVar[str] = "reward_head"

    def __call__(self, model: Transformer) -> Transformer:
        weight = model.embed_tokens.weight
        head = ScoreHead(model.config.dim, 1, bias=False, device=weight.device, dtype=torch.float32)
        if not weight.is_meta:
            nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.dim + 1))
        model.lm_head = head
        # The head no longer shares the embedding: saved and rebuilt as an untied model, then swapped again.
        model.config = model.config.replace(tie_word_embeddings=False)
        return model

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {"lm_head.weight": torch.float32}


def apply_reward_head(model: Transformer) -> Transformer:
    return apply_transforms(model, [RewardHead()])


def is_reward_model(model: nn.Module) -> bool:
    """Whether the model's output head is a ScoreHead (one score per position) rather than a language model's."""
    return isinstance(getattr(model, "lm_head", None), ScoreHead)


def scores(model: Transformer, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Each row's score at its last real token (B,). Rows are right-padded: a causal model never sees the padding,
    so a score does not depend on the batch it is in."""
    return model(input_ids, logits_at=last)[:, 0, 0]  # (B,)


def masked_scores(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score (B,) from a padded batch in Hugging Face's form (attention_mask 1 on real tokens), padded
    on either side: rows are moved to the left edge first, so a score is the same whatever the padding side."""
    lengths = attention_mask.sum(-1)  # (B,)
    real = attention_mask.bool()
    aligned = torch.zeros_like(input_ids)
    aligned[torch.arange(input_ids.size(1), device=input_ids.device)[None] < lengths[:, None]] = input_ids[real]
    return scores(model, aligned, lengths - 1)
