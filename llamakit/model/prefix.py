"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021), applied from outside the model.

Both give every attention layer P extra key/value slots that every token sees (`Attention.prefix`):
- prefix tuning learns those keys and values directly, in every layer;
- prompt tuning learns P input embeddings (a soft prompt); their keys and values in each layer are what
  the frozen model computes for them, at positions -P..-1 just before the text (so the text keeps
  positions 0.., and a KV cache and the decode loop need no offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llamakit.errors import ConfigError
from llamakit.model.llama import Transformer, rope_cos_sin


@dataclass
class PrefixConfig:
    """How many virtual tokens (slots) to learn."""

    num_virtual_tokens: int = 20
    init_seed: int = 0  # which vocabulary tokens initialise them

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")


class PrefixKV(nn.Module):
    """One layer's learned prefix: keys and values (KV, P, D), stored in fp32."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key = nn.Parameter(key.detach().float().clone())
        self.value = nn.Parameter(value.detach().float().clone())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key, self.value


class SoftPrompt(nn.Module):
    """The learned input embeddings of prompt tuning (P, dim), and each layer's keys/values for them."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding.detach().float().clone())
        self.layer_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cached_version: int | None = None

    def refresh(self, model: Transformer, _args) -> None:
        """Before each forward: run the soft prompt through the frozen layers (once, when not training)."""
        reuse = not torch.is_grad_enabled() and self._cached_version == self.embedding._version
        if not reuse:
            self.layer_kv = None  # the virtual pass itself must not see a prefix
            self.layer_kv = virtual_kv(model, self.embedding)
            self._cached_version = None if torch.is_grad_enabled() else self.embedding._version


class PromptKV(nn.Module):
    """What one layer's attention sees of the soft prompt (its parameters live in the SoftPrompt)."""

    def __init__(self, prompt: SoftPrompt, layer: int):
        super().__init__()
        self._prompt = [prompt]  # a list, so the prompt is not registered (and saved) once per layer
        self.layer = layer

    def forward(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        layer_kv = self._prompt[0].layer_kv
        return None if layer_kv is None else layer_kv[self.layer]


class _Recorder:
    """Stands in for a layer's KV cache to keep the keys and values it computes."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k[0], v[0]  # (KV, P, D)
        return k, v


def virtual_kv(model: Transformer, embeddings: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's rotated keys and values (KV, P, D) for input embeddings (P, dim) at positions -P..-1."""
    P = embeddings.size(0)
    weight = model.embed_tokens.weight
    h = embeddings.to(weight.dtype)[None]  # (1, P, dim)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(-P, 0, device=weight.device), h.dtype)
    recorders = [_Recorder() for _ in model.layers]
    for layer, recorder in zip(model.layers, recorders):
        h = layer(h, cos, sin, None, recorder)  # (1, P, dim)
    return [(r.k, r.v) for r in recorders]


def _vocabulary_sample(model: Transformer, cfg: PrefixConfig) -> torch.Tensor:
    """Embeddings of P vocabulary tokens drawn with cfg.init_seed (P, dim): a start the model can read."""
    generator = torch.Generator().manual_seed(cfg.init_seed)
    ids = torch.randint(model.config.vocab_size, (cfg.num_virtual_tokens,), generator=generator)
    return model.embed_tokens.weight.detach()[ids.to(model.embed_tokens.weight.device)].float()


def apply_prefix_tuning(model: Transformer, cfg: PrefixConfig) -> None:
    """Freeze the model and give each layer learned prefix keys/values, initialised from real tokens' ones."""
    model.requires_grad_(False)
    with torch.no_grad():
        kv = virtual_kv(model, _vocabulary_sample(model, cfg))
    for layer, (k, v) in zip(model.layers, kv):
        layer.self_attn.prefix = PrefixKV(k, v)


def apply_prompt_tuning(model: Transformer, cfg: PrefixConfig) -> SoftPrompt:
    """Freeze the model and put a learned soft prompt before every input, initialised from vocabulary embeddings."""
    model.requires_grad_(False)
    prompt = SoftPrompt(_vocabulary_sample(model, cfg))
    model.soft_prompt = prompt
    for i, layer in enumerate(model.layers):
        layer.self_attn.prefix = PromptKV(prompt, i)
    model.register_forward_pre_hook(prompt.refresh)
    return prompt
