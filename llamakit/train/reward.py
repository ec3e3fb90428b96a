"""`llamakit reward`: a model + preference pairs -> a reward model that scores the chosen answer higher.

The language model's output head is swapped for a scalar head (model/reward.py) and the model trains on the
pairwise ranking loss (train/preference.py) with the one loop. Full: everything trains, and the result is a
llamakit model folder that records the swap, so `load_model` returns the reward model. LoRA: a LoRA adapter on
the base plus the new head, trained whole; checkpoints and final/ hold both as a PEFT sequence-classification
adapter (task_type SEQ_CLS, modules_to_save ["score"]), which `load_reward_model(base, adapter=final)` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from llamakit.data.preference import RewardExamples
from llamakit.model.reward import apply_reward_head
from llamakit.train.config import CheckpointSection
from llamakit.train.dpo import PreferenceRunConfig, load_base_and_pairs
from llamakit.train.finetune import MethodSection, check_method
from llamakit.train.metrics import flops_per_token
from llamakit.train.parallel import Processes
from llamakit.train.preference import RewardConfig, RewardObjective
from llamakit.train.runner import Job, loop_data, run


@dataclass
class RewardCheckpoints(CheckpointSection):
    out_dir: str = "runs/reward"


@dataclass
class RewardMethod(MethodSection):
    name: str = "full"


@dataclass
class RewardRunConfig(PreferenceRunConfig):
    command: ClassVar[str] = "reward"
    checkpoint: RewardCheckpoints = field(default_factory=RewardCheckpoints)
    method: RewardMethod = field(default_factory=RewardMethod)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_method(self.method, ("full", "lora"), "reward models train",
                     " (a soft prompt or prefix cannot carry the new score head)")


def reward(cfg: RewardRunConfig, resume: bool = False) -> Path:
    """Train a reward model and return final/: a model folder (full) or a PEFT SEQ_CLS adapter folder (lora), whose
    output is one score per position."""
    return run(cfg, build_job, resume)


def build_job(cfg: RewardRunConfig, procs: Processes) -> Job:
    model, tokenizer, adapter, train_set, val_set = load_base_and_pairs(cfg, procs, RewardExamples)
    # After the method: LoRA froze the whole model and wraps only the projections, so the new head (fp32, random)
    # is neither frozen nor LoRA-wrapped: it trains whole, and an adapter's checkpoints save it with the LoRA weights.
    apply_reward_head(model)
    # Frozen weights need no weight gradients: the backward pass costs 2N instead of 4N FLOPs per token.
    flops = flops_per_token(model.config, cfg.data.seq_len) * (1 if adapter is None else 4 / 6)
    return Job(model.train(), RewardObjective(cfg.reward), loop_data(cfg, train_set, val_set, procs), tokenizer,
               flops, adapter=adapter, base=str(cfg.model.path))
