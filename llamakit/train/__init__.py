"""Training: one loop for every method, the LLaMA optimizer recipe, parallelism from outside, exact resume."""

from llamakit.train.config import PretrainConfig, RunConfig, parse_config
from llamakit.train.loop import LoopData, LoopSettings, evaluate, train
from llamakit.train.objectives import NextTokenLoss, Objective
from llamakit.train.pretrain import pretrain
from llamakit.train.runner import Job, run

__all__ = ["Job", "LoopData", "LoopSettings", "NextTokenLoss", "Objective", "PretrainConfig", "RunConfig", "evaluate",
           "parse_config", "pretrain", "run", "train"]
