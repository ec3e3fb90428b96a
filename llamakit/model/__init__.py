"""The Llama architecture: configuration, presets, the transformer and its KV cache."""

from llamakit.model.config import PRESETS, ModelConfig, RopeScaling, describe, resolve_dtype
from llamakit.model.kv_cache import KVCache
from llamakit.model.llama import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "describe", "resolve_dtype"]
