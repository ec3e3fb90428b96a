"""Generation: sampling (pure functions on logits), the decode loop and Meta's Llama API."""

from llamakit.generate.decode import Completion, generate, prepare_for_decoding, stream
from llamakit.generate.meta_api import Llama
from llamakit.generate.sampling import SamplingParams

__all__ = ["Completion", "Llama", "SamplingParams", "generate", "prepare_for_decoding", "stream"]
