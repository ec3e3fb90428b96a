"""GGUF files, what llama.cpp, Ollama and LM Studio run: one file with the config, the weights (float or in
quantized blocks) and the tokenizer.

Keys and tensor names are llama.cpp's for architecture "llama". llama.cpp rotates interleaved pairs like Meta's code,
so wq/wk rows are permuted on the way in and out (as its convert_hf_to_gguf.py's LlamaModel.permute does). Llama
3.1's RoPE scaling is the tensor rope_freqs: the divisor of each frequency, from which the four scaling settings
are recovered on reading. A file without output.weight has tied embeddings.

Writing quantizes with the gguf package's own port of ggml's code, choosing tensor types as llama.cpp does: 1-D
tensors (norms, rope_freqs) stay F32; a matrix whose rows are not whole 32-value blocks falls back to F16; for q4_0
the output head (and a tied embedding, which is the head) is Q8_0, llama.cpp's fallback for the Q6_K its quantizer
picks (gguf-py cannot write K-quants). Reading dequantizes any type the gguf package knows (F32/F16/BF16, Q4_0,
Q8_0, the K-quants ...), except that Q4_0 matrices load straight into Int4Linear when int4 is asked for
(read_gguf(int4=True)): a Q4_0 block is x = d * (q - 8) over 32 input columns, Int4Linear's group of 32 with
scale d and zero 0, so the 4-bit values are kept exactly and only d is rounded from fp16 to the kernel's bf16
(relative error <= 2^-8; requantizing would round every value a second time). Q8_0 has a scale per 32 values
where Int8Linear has one per output channel, so int8 is quantized again from the dequantized matrix.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from llamakit.checkpoint.gguf_file import GGUFContents, is_gguf, read_contents
from llamakit.checkpoint.gguf_vocab import chat_format_of, tokenizer_file, vocabulary_fields
from llamakit.checkpoint.meta import permute_rope_rows
from llamakit.errors import CheckpointError, ConfigError
from llamakit.model.config import ModelConfig, RopeScaling
from llamakit.model.llama import scale_frequencies
from llamakit.model.quantize import COMPUTE_DTYPE, INT4_OUT_MULTIPLE, TINY, pack_nibbles
from llamakit.tokenizer import Tokenizer

__all__ = ["TYPES", "gguf_name", "gguf_tokenizer", "is_gguf", "our_name", "read_gguf", "read_gguf_config", "write_gguf"]
log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(ours: str) -> str:
    """llama.cpp's tensor name for one of ours."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    _, layer, rest = ours.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def our_name(name: str) -> str | None:
    """Our tensor name for one of llama.cpp's (None if unknown)."""
    top = {v: k for k, v in TOP_NAMES.items()}
    if name in top:
        return top[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    layer = {v: k for k, v in LAYER_NAMES.items()}.get(match.group(2)) if match else None
    return f"layers.{match.group(1)}.{layer}" if layer else None


# ---- writing ----

WRITERS = {  # vocabulary_fields' keys -> the GGUFWriter methods that write tokenizer.ggml.* (or the chat template)
    "model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
    "scores": "add_token_scores", "token_type": "add_token_types", "merges": "add_token_merges",
    "bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id", "unknown_token_id": "add_unk_token_id",
    "padding_token_id": "add_pad_token_id", "add_bos_token": "add_add_bos_token", "add_eos_token": "add_add_eos_token",
    "add_space_prefix": "add_add_space_prefix", "chat_template": "add_chat_template",
}


def write_gguf(path: Path, config: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer | None,
               type: str = "f32") -> None:
    """Write config, tokenizer and weights to `path` (the caller makes it atomic), one tensor in memory at a time."""
    if type not in TYPES:
        raise CheckpointError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    writer = gguf.GGUFWriter(path, "llama")
    _add_config(writer, config, type)
    if tok is not None:
        for key, value in vocabulary_fields(tok, config.vocab_size, config.chat_format).items():
            getattr(writer, WRITERS[key])(value)
    plan = [(gguf_name(name), name, _tensor_type(name, tensor, config, type)) for name, tensor in state.items()]
    if config.use_scaled_rope:
        plan.append((ROPE_FREQS, None, Q.F32))
    for gname, name, qtype in plan:
        shape = tuple(state[name].shape) if name else (config.head_dim // 2,)
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.uint8)
        byte_shape = shape if dtype is not np.uint8 else gguf.quant_shape_to_byte_shape(shape, qtype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(gname, byte_shape, np.dtype(dtype), math.prod(shape) // block * size, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, name, qtype in plan:
        values = _rope_freqs(config) if name is None else _meta_layout(name, state[name], config)
        writer.write_tensor_data(gguf.quants.quantize(values, qtype))
    writer.close()


def _add_config(writer: gguf.GGUFWriter, config: ModelConfig, type: str) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(FILE_TYPES[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_type(name: str, tensor: torch.Tensor, config: ModelConfig, type: str) -> Q:
    """The GGML type a tensor is written in (llama.cpp's choices; see the module docstring)."""
    qtype = TYPES[type]
    if tensor.dim() < 2:
        return Q.F32
    head = name == "lm_head.weight" or (name == "embed_tokens.weight" and config.tie_word_embeddings)
    if qtype == Q.Q4_0 and head:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        log.info("%s: rows of %d values are not whole %s blocks; written as F16", name, tensor.shape[-1], qtype.name)
        return Q.F16
    return qtype


def _meta_layout(name: str, tensor: torch.Tensor, config: ModelConfig) -> np.ndarray:
    return permute_rope_rows(name, tensor.detach().float(), config, to_halves=False).contiguous().numpy()


def _rope_freqs(config: ModelConfig) -> np.ndarray:
    """Llama 3.1 scaling as the divisor of each frequency (what llama.cpp reads from rope_freqs)."""
    return rope_divisors(config.rope_theta, config.head_dim, config.rope_scaling).astype(np.float32)


def rope_divisors(theta: float, head_dim: int, scaling: RopeScaling) -> np.ndarray:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    return (inv_freq / scale_frequencies(inv_freq, scaling)).numpy()


# ---- reading ----

def read_gguf_config(path: Path, contents: GGUFContents | None = None) -> ModelConfig:
    """ModelConfig from the llama.* keys, the tensors present (output.weight, rope_freqs) and the chat template."""
    contents = contents or read_contents(path)
    meta, tensors = contents.meta, contents.tensors
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; llamakit loads architecture "
                              "'llama' (Llama 1/2/3, tinyllamas)")
    if meta.get("llama.expert_count"):
        raise CheckpointError(f"{path}: a mixture-of-experts model ({meta['llama.expert_count']} experts); "
                              "llamakit loads dense Llama models only")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise CheckpointError(f"{path}: RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported (only "
                              "Llama 3.1's, stored as rope_freqs)")
    if isinstance(meta.get("llama.attention.head_count_kv"), list):
        raise CheckpointError(f"{path}: a different number of KV heads per layer; llamakit's Llama has one for all")
    try:
        heads = meta["llama.attention.head_count"]
        config = ModelConfig(
            dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"], n_heads=heads,
            n_kv_heads=meta.get("llama.attention.head_count_kv", heads),
            vocab_size=meta.get("llama.vocab_size") or _vocab_size(meta, tensors, path),
            hidden_dim=meta["llama.feed_forward_length"], norm_eps=_f32(meta["llama.attention.layer_norm_rms_epsilon"]),
            rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)), max_seq_len=meta["llama.context_length"],
            tie_word_embeddings="output.weight" not in tensors,
            chat_format=chat_format_of(meta.get("tokenizer.chat_template"), meta.get("tokenizer.ggml.model")))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r}; the file is not a complete llama GGUF") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if meta.get("llama.rope.dimension_count", config.head_dim) != config.head_dim:
        raise CheckpointError(f"{path}: rope.dimension_count {meta['llama.rope.dimension_count']} differs from "
                              f"head_dim {config.head_dim}; partial rotary embeddings are not Llama's")
    if ROPE_FREQS in tensors:
        config = config.replace(use_scaled_rope=True, rope_scaling=_rope_scaling(
            contents.data(ROPE_FREQS).astype(np.float64), config, path))
    return config


def _f32(value: float) -> float:
    """A float32 key as the decimal it was written from (1e-05, not 9.99999974737875e-06)."""
    return float(str(np.float32(value)))


def _vocab_size(meta: dict, tensors: dict, path: Path) -> int:
    if "tokenizer.ggml.tokens" in meta:
        return len(meta["tokenizer.ggml.tokens"])
    if "token_embd.weight" in tensors:
        return tensors["token_embd.weight"].shape[0]
    raise CheckpointError(f"{path}: no vocab_size, tokens or token_embd.weight; the file is not a complete llama GGUF")


def _rope_scaling(divisors: np.ndarray, config: ModelConfig, path: Path) -> RopeScaling:
    """Llama 3.1 settings that give these divisors: Meta's (low 1, high 4, original 8192) with the largest divisor
    as the factor, or else settings fitted to them. Only the ratios of original, low and high show in the divisors,
    so low is taken as 1 (and high as 4 when fewer than two frequencies are blended)."""
    factor = float(divisors.max())
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    wavelen = 2 * math.pi / inv_freq
    kept, band = divisors < 1 + 1e-6, (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    blend = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)  # 0 scaled .. 1 kept: (original/λ - low)/(high - low)
    fits = [(8192.0, 4.0)]  # (original, high)
    if band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[band], blend, 1)
        fits.append((slope / -intercept, 1 - 1 / intercept) if intercept < 0 else fits[0])
    elif band.sum() == 1:
        fits.append((float(wavelen[band][0] * (3 * blend[0] + 1)), 4.0))
    elif kept.any() and not kept.all():  # anything between 4x the longest kept wavelength and the shortest scaled
        fits.append((math.sqrt(4 * wavelen[kept].max() * wavelen[~kept].min()), 4.0))
    for original, high in fits:
        scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=round(float(high), 6),
                              original_max_seq_len=max(1, round(original)))
        if factor > 1 and np.allclose(rope_divisors(config.rope_theta, config.head_dim, scaling), divisors, rtol=1e-5):
            return scaling
    raise CheckpointError(f"{path}: rope_freqs does not follow Llama 3.1's RoPE scaling; llamakit cannot run "
                          "other frequency factors")


def read_gguf(path: Path, int4: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our names, rotate-half layout): F32/F16/BF16 as stored (memory-mapped), other types
    dequantized to float32, except Q4_0 projections as Int4Linear entries when `int4`."""
    contents = read_contents(path)
    config = read_gguf_config(path, contents)
    state = {}
    for gname, info in contents.tensors.items():
        if gname == ROPE_FREQS:
            continue  # read into the config
        name = our_name(gname)
        if name is None:
            raise CheckpointError(f"{path}: unknown tensor {gname!r}; this is not a plain Llama GGUF")
        if int4 and info.type == Q.Q4_0 and name.endswith("_proj.weight"):  # int4 keeps the head at int8
            state.update(_int4_entries(name, contents.data(gname), config))
        else:
            state[name] = permute_rope_rows(name, _float(contents, gname), config, to_halves=True)
    return config, state


def _float(contents: GGUFContents, name: str) -> torch.Tensor:
    """F32/F16/BF16 as stored, memory-mapped; any other type dequantized to float32 by the gguf package."""
    data, kind = contents.data(name), contents.tensors[name].type
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(data)
    if kind == Q.BF16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(gguf.quants.dequantize(data, kind))
    except NotImplementedError:
        raise CheckpointError(f"{contents.path}: tensor {name} is of type {kind.name}, which the gguf package cannot "
                              "dequantize; requantize the file (e.g. to Q8_0 or Q4_K) with llama-quantize") from None


def _int4_entries(name: str, blocks: np.ndarray, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Int4Linear's qweight (pack_nibbles layout) and scales_and_zeros for a Q4_0 matrix, its 4-bit values kept.

    A Q4_0 block is 2 bytes of fp16 scale d and 16 bytes of values: byte j holds value j in its low nibble and value
    j + 16 in its high one, and x = d * (q - 8): Int4Linear's (q - 8) * scale + zero with zero 0."""
    rows = blocks.shape[0]
    blocks = torch.from_numpy(np.ascontiguousarray(blocks)).view(rows, -1, 18)  # (out, in/32, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # (out, G)
    packed = blocks[..., 2:]  # (out, G, 16)
    q = torch.cat((packed & 15, packed >> 4), dim=-1).reshape(rows, -1)  # (out, in)
    q, d = (permute_rope_rows(name, t, config, to_halves=True) for t in (q, d))
    n = -(-rows // INT4_OUT_MULTIPLE) * INT4_OUT_MULTIPLE
    q = torch.cat((q, q.new_full((n - rows, q.size(1)), 8)))  # (n, in): padded rows are zero weights
    scales = torch.cat((d.to(COMPUTE_DTYPE), torch.full((n - rows, d.size(1)), TINY, dtype=COMPUTE_DTYPE)))  # (n, G)
    scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).transpose(0, 1).contiguous()  # (G, n, 2)
    module = name.removesuffix(".weight")
    return {f"{module}.qweight": pack_nibbles(q), f"{module}.scales_and_zeros": scales_and_zeros}


def gguf_tokenizer(path: Path) -> Path | None:
    """A tokenizer file rebuilt from the GGUF's vocabulary (see gguf_vocab.tokenizer_file); None if it has none."""
    return tokenizer_file(read_contents(path).meta, path)
