"""llama2.c model files: float32 weights behind a small header, as run.c reads them.

v0 ("legacy", what the public tinyllamas use): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, max_seq_len; a negative vocab_size means an unshared classifier), then the weights grouped
by kind across layers, then precomputed RoPE cos/sin tables, then the classifier if unshared.
v1: a 256-byte header (magic "ak42", version, the same 7 ints, a shared-classifier byte), then the
norms first and no RoPE tables. run.c hard-codes rope_theta 10000 and norm eps 1e-5, and rotates
interleaved pairs like Meta's code, so wq/wk are permuted on the way in and out.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from llamakit.checkpoint.meta import permute_rope_rows
from llamakit.errors import CheckpointError
from llamakit.model.config import ModelConfig
from llamakit.model.llama import rope_cos_sin, rope_frequencies

V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")
V1_MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
LAYER_KINDS = {  # llama2.c's names, in file order, for our per-layer weights
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight",
    "w3": "mlp.up_proj.weight",
}


def read_header(path: Path) -> tuple[int, ModelConfig, int] | None:
    """(version, config, data offset) if `path` is a complete llama2.c float32 file, else None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) >= V1_HEADER.size and struct.unpack_from("<I", head)[0] == V1_MAGIC:
        _, version, *dims, shared = V1_HEADER.unpack_from(head)
        if version != 1:
            raise CheckpointError(f"{path}: llama2.c file version {version} (quantized) is not supported; "
                                  "export it with --version 0 or 1 (float32)")
        version, offset = 1, V1_HEADER_BYTES
    elif len(head) >= V0_HEADER.size:
        dims = list(V0_HEADER.unpack_from(head))
        shared, dims[5] = dims[5] > 0, abs(dims[5])
        version, offset = 0, V0_HEADER.size
    else:
        return None
    config = _config(dims, bool(shared))
    if config is None or offset + 4 * sum(n for _, n in _layout(config, version)) != size:
        return None
    return version, config, offset


def _config(dims: list[int], shared: bool) -> ModelConfig | None:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = dims
    if min(dims) <= 0 or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        return None
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                       hidden_dim=hidden_dim, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=max_seq_len,
                       tie_word_embeddings=shared)


def _layout(config: ModelConfig, version: int) -> list[tuple[str | None, int]]:
    """(our name or None for skipped data, element count) in file order."""
    L = range(config.n_layers)
    attn_norms = [f"layers.{i}.input_layernorm.weight" for i in L]
    ffn_norms = [f"layers.{i}.post_attention_layernorm.weight" for i in L]

    def kinds(*names):
        return [f"layers.{i}.{LAYER_KINDS[k]}" for k in names for i in L]

    if version == 0:
        order = (["embed_tokens.weight"] + attn_norms + kinds("wq", "wk", "wv", "wo") + ffn_norms
                 + kinds("w1", "w2", "w3") + ["norm.weight", None, None])  # None: RoPE cos, sin tables
    else:
        order = attn_norms + ffn_norms + ["norm.weight", "embed_tokens.weight"] + kinds("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    if not config.tie_word_embeddings:
        order.append("lm_head.weight")
    shapes, table = _shapes(config), config.max_seq_len * config.head_dim // 2
    return [(name, table if name is None else math.prod(shapes[name])) for name in order]


def read_llama2c(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights (our names, rotate-half layout) of a llama2.c v0/v1 file, memory-mapped."""
    header = read_header(path)
    if header is None:
        raise CheckpointError(f"{path}: not a llama2.c model file (header and file size do not match)")
    version, config, offset = header
    data = np.memmap(path, dtype="<f4", mode="c", offset=offset)  # copy-on-write: the file is never modified
    shapes, state, pos = _shapes(config), {}, 0
    for name, count in _layout(config, version):
        if name is not None:
            tensor = torch.from_numpy(data[pos:pos + count]).view(shapes[name])
            state[name] = permute_rope_rows(name, tensor, config, to_halves=True)
        pos += count
    return config, state


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes = {"embed_tokens.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,),
              "lm_head.weight": (c.vocab_size, c.dim)}
    per_layer = {"self_attn.q_proj.weight": (c.dim, c.dim), "self_attn.k_proj.weight": (c.kv_heads * c.head_dim, c.dim),
                 "self_attn.v_proj.weight": (c.kv_heads * c.head_dim, c.dim), "self_attn.o_proj.weight": (c.dim, c.dim),
                 "mlp.gate_proj.weight": (c.ffn_hidden_dim, c.dim), "mlp.down_proj.weight": (c.dim, c.ffn_hidden_dim),
                 "mlp.up_proj.weight": (c.ffn_hidden_dim, c.dim), "input_layernorm.weight": (c.dim,),
                 "post_attention_layernorm.weight": (c.dim,)}
    for i in range(c.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def write_llama2c(path: Path, config: ModelConfig, state: dict[str, torch.Tensor], version: int = 0) -> None:
    """Write a float32 llama2.c file (v0 by default: the layout run.c reads)."""
    _check_writable(config)
    with open(path, "wb") as f:
        if version == 0:
            vocab = config.vocab_size if config.tie_word_embeddings else -config.vocab_size
            f.write(V0_HEADER.pack(config.dim, config.ffn_hidden_dim, config.n_layers, config.n_heads,
                                   config.kv_heads, vocab, config.max_seq_len))
        else:
            head = V1_HEADER.pack(V1_MAGIC, 1, config.dim, config.ffn_hidden_dim, config.n_layers, config.n_heads,
                                  config.kv_heads, config.vocab_size, config.max_seq_len, config.tie_word_embeddings)
            f.write(head.ljust(V1_HEADER_BYTES, b"\0"))
        cos, sin = _rope_tables(config)
        tables = iter((cos, sin))
        for name, _ in _layout(config, version):
            tensor = next(tables) if name is None else permute_rope_rows(name, state[name], config, to_halves=False)
            f.write(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())


def _rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """run.c's (unused) precomputed cos/sin tables, (max_seq_len, head_dim/2) each."""
    cos, sin = rope_cos_sin(rope_frequencies(config), torch.arange(config.max_seq_len), torch.float32)
    half = config.head_dim // 2
    return cos[:, :half], sin[:, :half]


def _check_writable(config: ModelConfig) -> None:
    if config.rope_theta != 10000.0 or config.use_scaled_rope or config.norm_eps != 1e-5:
        raise CheckpointError(
            "the llama2.c format cannot store this model: run.c assumes rope_theta=10000, no RoPE scaling and "
            f"norm_eps=1e-5 (model has rope_theta={config.rope_theta}, use_scaled_rope={config.use_scaled_rope}, "
            f"norm_eps={config.norm_eps}); convert to hf, meta or llamakit instead")
