"""llamakit: the LLaMA family end to end, readable, fast and exact."""

from llamakit.checkpoint import load_model, save_model
from llamakit.errors import LlamakitError
from llamakit.model import ModelConfig, Transformer
from llamakit.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["LlamakitError", "ModelConfig", "Tokenizer", "Transformer", "load_model", "load_tokenizer", "save_model"]
