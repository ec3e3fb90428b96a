"""llamakit: the LLaMA family end to end, readable, fast and exact."""

from llamakit.checkpoint import load_checkpoint, load_model, save_model
from llamakit.errors import LlamakitError
from llamakit.generate import Llama, SamplingParams, generate, stream
from llamakit.model import ModelConfig, Transformer
from llamakit.tokenizer import Tokenizer, encode_dialog, load_tokenizer

__version__ = "0.1.0"
__all__ = ["Llama", "LlamakitError", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer", "encode_dialog",
           "generate", "load_checkpoint", "load_model", "load_tokenizer", "save_model", "stream"]
