"""Training: one loop for every method, the LLaMA optimizer recipe, parallelism from outside, exact resume."""

from llamakit.train.config import PretrainConfig, parse_config
from llamakit.train.loop import LoopData, LoopSettings, evaluate, train
from llamakit.train.objectives import NextTokenLoss
from llamakit.train.pretrain import pretrain

__all__ = ["LoopData", "LoopSettings", "NextTokenLoss", "PretrainConfig", "evaluate", "parse_config", "pretrain",
           "train"]
