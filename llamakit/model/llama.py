"""The Llama transformer: the whole forward pass, for training (full causal sequence) and decoding (a KV cache
the caller owns and passes in).

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, KV key/value heads, D head_dim.
Module names follow Hugging Face (q_proj, gate_proj, ...) so HF checkpoints and PEFT adapters map 1:1;
rotary embeddings use the "rotate half" layout, and Meta's interleaved layout is converted in checkpoint/.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamakit.model.config import ModelConfig, RopeScaling
from llamakit.model.kv_cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (LLaMA's pre-normalisation), computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_frequencies(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) of the rotary embedding, with Llama 3.1 scaling if enabled."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))  # (D/2,)
    if config.use_scaled_rope:
        inv_freq = scale_frequencies(inv_freq, config.rope_scaling)
    return inv_freq


def scale_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 context extension: divide low frequencies by `factor`, keep high ones, blend in between."""
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_seq_len / s.low_freq_factor  # longer waves than this are fully scaled
    short_wavelen = s.original_max_seq_len / s.high_freq_factor  # shorter waves than this are kept
    blend = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / s.factor, blended)
    return torch.where(wavelen < short_wavelen, inv_freq, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position * frequency, duplicated for the two halves of a head.

    positions (T,) gives (T, D) tables shared by the batch; per-row positions (B, T) give (B, 1, T, D).
    """
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, D)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # (B, 1, T, D): one table per row, broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair of x (B, heads, T, D) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, heads, T, D)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query self-attention: n_kv_heads == n_heads is MHA, 1 is MQA, anything between is GQA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.prefix: nn.Module | None = None  # prefix/prompt tuning: called for (k, v) slots every query sees

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv: LayerCache | None) -> torch.Tensor:
        # Head counts come from the projections' outputs, not the config: under tensor parallelism each
        # process computes only its share of the heads.
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, KV, S, D): this slot's earlier tokens and the new ones
        # Without an explicit mask: causal over the new tokens, except one new token sees the whole cache.
        is_causal = mask is None and T > 1
        if self.prefix is not None and (prefix := self.prefix()) is not None:
            k, v, mask = prepend_prefix(prefix, k, v, mask, T)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=k.size(1) != q.size(1))  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


def prepend_prefix(prefix: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, T: int):
    """Put P extra key/value slots (KV, P, D) before the S sequence slots, visible to every query."""
    pk, pv = prefix
    B, S, P = k.size(0), k.size(2), pk.size(-2)
    k = torch.cat((pk.to(k.dtype).expand(B, *pk.shape), k), dim=2)  # (B, KV, P + S, D)
    v = torch.cat((pv.to(v.dtype).expand(B, *pv.shape), v), dim=2)  # (B, KV, P + S, D)
    if mask is None and T == 1:
        return k, v, None
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)  # causal (T, S)
    return k, v, torch.cat((mask.new_ones(*mask.shape[:-1], P), mask), dim=-1)  # (..., T, P + S)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.gate_proj = nn.Linear(config.dim, hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv: LayerCache | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class TiedHead(nn.Module):
    """The output projection of a tied model (Llama 3.2, tinyllamas): the embedding matrix, owned by the embedding.

    A module of its own, so a quantized or parallel head can replace it from outside like any other.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list, so the matrix is not registered (and saved) twice

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class Transformer(nn.Module):
    """A Llama model: token ids (B, T) -> fp32 logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = (TiedHead(self.embed_tokens) if config.tie_word_embeddings
                        else nn.Linear(config.dim, config.vocab_size, bias=False))
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.init_weights()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, slots: Sequence[int] | None = None, *,
                mask: torch.Tensor | None = None, logits_at: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `tokens` (B, T): a whole sequence per row from position 0, or, with a cache, T more
        tokens appended to each of `slots` (default 0..B-1), which then hold them.

        Without a cache, `mask` (B, 1, T, T) may restrict attention further (packed documents).
        `logits_at` (an index, or a (B,) tensor of per-row indices) computes the logits of one
        position per row, which is all decoding needs.
        """
        B, T = tokens.shape
        h = self.embed_tokens(tokens)  # (B, T, dim)
        view = None
        if cache is not None:
            slots = list(range(B)) if slots is None else list(slots)
            view = cache.view(slots, T)
            positions, mask = view.positions, view.mask  # (T,) or (B, T); None, (T, S) or (B, 1, T, S)
        else:
            positions = torch.arange(T, device=tokens.device)  # (T,)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)  # (T, D) or (B, 1, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if view is None else view.layer(i))
        if isinstance(logits_at, int):
            h = h[:, [logits_at]]  # (B, 1, dim)
        elif logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at].unsqueeze(1)  # (B, 1, dim)
        logits = self.lm_head(self.norm(h)).float()  # (B, T or 1, vocab_size)
        if cache is not None:
            cache.append(slots, T)  # only once the forward has succeeded
        return logits

    def init_buffers(self) -> None:
        """(Re)compute non-persistent buffers on the parameters' device, e.g. after loading on meta."""
        self.inv_freq = rope_frequencies(self.config, device=self.embed_tokens.weight.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would also cast inv_freq, and bf16 frequencies ruin positions in the thousands:
        # recompute them in fp32 after every move or cast.
        super()._apply(fn, recurse)
        self.init_buffers()
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialise for training from scratch: N(0, std), residual projections scaled by 1/sqrt(2L)."""
        self.init_buffers()
        if self.embed_tokens.weight.is_meta:
            return
        residual_std = std / math.sqrt(2 * self.config.n_layers)  # GPT-2: keep the residual stream's scale
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
