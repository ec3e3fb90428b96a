"""Generation: sampling (pure functions on logits), the engine (prefill/decode_one on a caller-owned KV cache, the
Decoder), the drivers over it (generate, stream) and Meta's Llama API."""

from llamakit.generate.decode import Completion, generate, prepare_for_decoding, stream
from llamakit.generate.engine import Decoder, decode_one, prefill, prefill_batch
from llamakit.generate.meta_api import Llama
from llamakit.generate.sampling import SamplingParams
from llamakit.generate.speculative import (
                                           ModelDrafter,
                                           PromptLookupDrafter,
                                           Speculation,
                                           SpeculativeStats,
                                           speculative_generate,
                                           speculative_stream,
)

__all__ = ["Completion", "Decoder", "Llama", "ModelDrafter", "PromptLookupDrafter", "SamplingParams", "Speculation",
           "SpeculativeStats", "decode_one", "generate", "prefill", "prefill_batch",
           "prepare_for_decoding", "speculative_generate", "speculative_stream", "stream"]
