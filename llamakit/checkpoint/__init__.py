"""Checkpoint formats: the only code that knows foreign key names (Meta, Hugging Face, llama2.c, GGUF)."""

from llamakit.checkpoint.load import (
                                      detect_format,
                                      find_tokenizer,
                                      load_checkpoint,
                                      load_config,
                                      load_model,
                                      load_reward_model,
                                      read_checkpoint,
)
from llamakit.checkpoint.save import FORMATS, save_model

__all__ = ["FORMATS", "detect_format", "find_tokenizer", "load_checkpoint", "load_config", "load_model",
           "load_reward_model", "read_checkpoint", "save_model"]
