"""Meta's checkpoints: params.json + consolidated.NN.pth, one file per model-parallel rank.

Meta shards each weight the way fairscale's parallel layers split it: column-parallel projections
(wq wk wv w1 w3 output) along the output dimension, row-parallel ones (wo w2) along the input
dimension, norms replicated. The embedding is split along its width in Llama 2 (ParallelEmbedding)
and along the vocabulary in Llama 3 (VocabParallelEmbedding); we tell them apart by shape.
Meta's RoPE rotates interleaved pairs (x0, x1), ours rotates halves (x_i, x_{i+D/2}): wq and wk rows
are permuted once here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from llamakit.checkpoint.io import read_json, torch_load, write_json
from llamakit.errors import CheckpointError, ConfigError
from llamakit.model.config import ModelConfig, RopeScaling, meta_ffn_params, meta_hidden_dim

SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
IGNORED_KEYS = ("rope.freqs",)  # precomputed frequencies in Llama 1/2 files; we recompute them

# our suffix -> (Meta suffix, shard dim: 0 column-parallel, 1 row-parallel, None replicated)
LAYER_KEYS = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
TOP_KEYS = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def meta_to_ours(name: str) -> str | None:
    """Our parameter name for a Meta key (None if unknown)."""
    for ours, meta in TOP_KEYS.items():
        if name == meta:
            return ours
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        for ours, (meta, _) in LAYER_KEYS.items():
            if match.group(2) == meta:
                return f"layers.{match.group(1)}.{ours}"
    return None


def ours_to_meta(name: str) -> tuple[str, int | None]:
    """(Meta key, shard dim) for one of our parameter names; the embedding's dim is decided by the caller."""
    if name in TOP_KEYS:
        return TOP_KEYS[name], {"norm.weight": None, "lm_head.weight": 0}.get(name)
    prefix, _, suffix = name.partition(".")
    layer, _, rest = suffix.partition(".")
    meta, dim = LAYER_KEYS[rest]
    return f"{prefix}.{layer}.{meta}", dim


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows from Meta's interleaved RoPE pairs to the rotate-half layout."""
    out_features, in_features = w.shape
    D = out_features // n_heads
    return w.view(n_heads, D // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_halves."""
    out_features, in_features = w.shape
    D = out_features // n_heads
    return w.view(n_heads, 2, D // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def permute_rope_rows(name: str, tensor: torch.Tensor, config: ModelConfig, to_halves: bool) -> torch.Tensor:
    """Convert wq/wk between Meta's interleaved layout and ours (to_halves) or back; other weights pass."""
    if name.endswith("q_proj.weight"):
        heads = config.n_heads
    elif name.endswith("k_proj.weight"):
        heads = config.kv_heads
    else:
        return tensor
    return interleaved_to_halves(tensor, heads) if to_halves else halves_to_interleaved(tensor, heads)


def shard_files(folder: Path) -> dict[int, Path]:
    """The consolidated.NN.pth files by rank (completeness is checked against their shapes on opening)."""
    found = dict(sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))))
    if not found:
        raise CheckpointError(f"{folder}: params.json found but no consolidated.NN.pth weight files")
    return found


def config_from_params(folder: Path, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from params.json; `vocab_size` fills Meta's -1 (Llama 1/2 read it from the tokenizer)."""
    params = read_json(folder / "params.json")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "rope_scaling_factor",
             "low_freq_factor", "high_freq_factor", "original_max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{folder / 'params.json'}: unknown field(s) {unknown}")
    if not isinstance(params.get("vocab_size", -1), int) or params.get("vocab_size", -1) <= 0:
        if vocab_size is None:
            raise CheckpointError(f"{folder / 'params.json'}: vocab_size is -1 and no embedding to read it from")
        params["vocab_size"] = vocab_size
    scaling = RopeScaling(factor=params.pop("rope_scaling_factor", _default_scaling_factor(params)),
                          low_freq_factor=params.pop("low_freq_factor", 1.0),
                          high_freq_factor=params.pop("high_freq_factor", 4.0),
                          original_max_seq_len=params.pop("original_max_seq_len", 8192))
    params.pop("max_batch_size", None)
    # params.json has no context length (Meta passes it to Llama.build); this only sizes default caches.
    params.setdefault("max_seq_len", 131072 if params.get("use_scaled_rope") else 8192
                      if params.get("rope_theta", 1e4) >= 5e5 else 4096)
    try:
        return ModelConfig(**params, rope_scaling=scaling)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{folder / 'params.json'}: {e}") from None


def _default_scaling_factor(params: dict) -> float:
    """Meta's Llama 3.2 1B/3B params.json omit the RoPE scaling factor (32, not 3.1's 8): infer it from the shape."""
    is_llama32 = params.get("use_scaled_rope") and (params.get("dim"), params.get("n_layers")) in {(2048, 16), (3072, 28)}
    return 32.0 if is_llama32 else 8.0


def read_meta_config(folder: Path) -> ModelConfig:
    """The config without reading weights: the vocabulary size comes from the embedding shards' shapes.

    A model counts as tied here only when it stores no output matrix (loading also ties one equal to the
    embedding, which needs the data).
    """
    width = read_json(folder / "params.json").get("dim")
    shards = _open_shards(folder, width)  # memory-mapped: only shapes are read
    embeds = [s["tok_embeddings.weight"] for s in shards]
    vocab = sum(e.shape[0] for e in embeds) if embeds[0].shape[1] == width else embeds[0].shape[0]
    config = config_from_params(folder, vocab_size=vocab)
    return config.replace(tie_word_embeddings="output.weight" not in shards[0])


def read_meta(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and merged weights (our names, rotate-half layout) from any number of shards."""
    width = read_json(folder / "params.json").get("dim")
    shards = _open_shards(folder, width)
    merged = {}
    for key in shards[0]:
        if key in IGNORED_KEYS:
            continue
        name = meta_to_ours(key)
        if name is None:
            raise CheckpointError(f"{folder}: unknown weight {key!r} in consolidated.00.pth")
        merged[name] = _merge(name, [s[key] for s in shards], width)
    embed = merged["embed_tokens.weight"]
    config = config_from_params(folder, vocab_size=embed.shape[0])
    tied = "lm_head.weight" not in merged or torch.equal(merged["lm_head.weight"], embed)
    if tied:  # Meta writes the shared matrix twice for tied models (Llama 3.2); we keep one copy
        merged.pop("lm_head.weight", None)
    config = config.replace(tie_word_embeddings=tied)
    return config, {name: permute_rope_rows(name, t, config, to_halves=True) for name, t in merged.items()}


def _open_shards(folder: Path, width: int | None) -> list[dict[str, torch.Tensor]]:
    """Every shard's state dict (memory-mapped), checked to be one complete set of distinct ranks."""
    found = shard_files(folder)
    files, shards = list(found.values()), [torch_load(path) for path in found.values()]
    _check_pieces(files, shards)
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight; this is not a Llama checkpoint")
    count = _shard_count(width, files[0], shards[0]) or max(found) + 1
    missing = [f"consolidated.{rank:02d}.pth" for rank in range(count) if rank not in found]
    if missing:
        raise CheckpointError(f"{folder}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
                              f"(the weights are split into {count} shards); the download or copy is incomplete")
    extra = [path.name for rank, path in found.items() if rank >= count]
    if extra:
        raise CheckpointError(f"{folder}: {', '.join(extra)} not part of this checkpoint, whose weights are split "
                              f"into {count} shards (consolidated.00..{count - 1:02d}.pth); move the extra files away")
    _check_distinct(files, shards)
    return shards


def _check_pieces(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> None:
    """Every shard holds a piece of every weight, and the pieces are what torch.chunk cuts from one tensor."""
    for file, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))[:3]
            raise CheckpointError(f"{file}: holds different weights than {files[0].name} (e.g. {diff}); "
                                  "the shards come from different checkpoints or one is damaged")
    for key in shards[0]:
        pieces = [shard[key] for shard in shards]
        if len({p.dtype for p in pieces}) > 1 or not _chunked([tuple(p.shape) for p in pieces]):
            found = ", ".join(f"{tuple(p.shape)} {p.dtype} in {f.name}" for f, p in zip(files, pieces, strict=True))
            raise CheckpointError(f"{files[0].parent}: the shards' pieces of {key} do not fit together ({found}); "
                                  "the shards come from different checkpoints")


def _chunked(shapes: list[tuple[int, ...]]) -> bool:
    """Whether these shapes are what torch.chunk makes of one tensor along one dimension (or copies of it)."""
    if len({len(shape) for shape in shapes}) > 1:
        return False
    split = [d for d in range(len(shapes[0])) if len({shape[d] for shape in shapes}) > 1]
    if not split:
        return True
    sizes = [shape[split[0]] for shape in shapes]
    step = -(-sum(sizes) // len(sizes))  # torch.chunk: equal pieces of ceil(n / N), the last one smaller
    return len(split) == 1 and sizes == [step] * (len(sizes) - 1) + [sum(sizes) - step * (len(sizes) - 1)]


def _shard_count(width: int | None, file: Path, shard: dict[str, torch.Tensor]) -> int | None:
    """How many pieces the weights were split into: wq is split by rows, so its pieces are (dim / shards, dim)."""
    wq = shard.get("layers.0.attention.wq.weight")
    if not isinstance(width, int) or wq is None or wq.dim() != 2:
        return None  # the config or the weights are malformed; loading reports it by name
    rows, dim = wq.shape
    if dim != width:  # the weights' own width: params.json is the odd one out, not the shard files
        raise CheckpointError(f"{file.parent / 'params.json'}: dim={width}, but the weights are {dim} wide "
                              f"(layers.0.attention.wq.weight is {rows} x {dim}); this params.json belongs to "
                              "another model")
    if rows == 0 or dim % rows:
        raise CheckpointError(f"{file}: layers.0.attention.wq.weight has {rows} rows, not a whole share of "
                              f"dim={dim}; the file is damaged or not a Meta shard")
    return dim // rows


def _check_distinct(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> None:
    """No shard is a copy of another: every matrix is split across ranks, so two ranks never hold equal ones."""
    matrices = sorted((k for k, t in shards[0].items() if t.dim() == 2), key=lambda k: shards[0][k].numel())
    for i, j in itertools.combinations(range(len(shards)), 2):
        # smallest first: real shards differ in the first matrix compared, so this reads little
        if all(torch.equal(shards[i][k], shards[j][k]) for k in matrices):
            raise CheckpointError(f"{files[j]}: holds the same weights as {files[i].name}, so one is a copy of the "
                                  "other rather than its own shard; download the checkpoint again")


def _merge(name: str, pieces: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate one weight's model-parallel pieces along the dimension Meta split it."""
    if len(pieces) == 1:
        return pieces[0]
    if name == "embed_tokens.weight":
        dim = 0 if pieces[0].shape[1] == width else 1  # full width: split by vocabulary (Llama 3)
    else:
        dim = ours_to_meta(name)[1]
    if dim is None:  # replicated (norms): every rank holds the same tensor
        return pieces[0]
    return torch.cat(pieces, dim=dim)  # the pieces were checked to fit together


def write_meta(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], shards: int) -> None:
    """Write params.json and `shards` consolidated.NN.pth files that Meta's loaders accept."""
    _check_shardable(config, shards)
    embed_dim = _embedding_split(config, shards)
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, tensor in _meta_layout(config, state):
        key, dim = ours_to_meta(name)
        dim = embed_dim if name == "embed_tokens.weight" else dim
        for rank in range(shards):
            part = tensor if dim is None else tensor.chunk(shards, dim=dim)[rank]
            # A compact copy of its own: torch.save would store a view's whole storage, strides and all.
            pieces[rank][key] = part.clone(memory_format=torch.contiguous_format)
    for rank, piece in enumerate(pieces):
        torch.save(piece, folder / f"consolidated.{rank:02d}.pth")
    write_json(folder / "params.json", params_json(config))


def _meta_layout(config: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state.items():
        yield name, permute_rope_rows(name, tensor, config, to_halves=False)
    if config.tie_word_embeddings:  # Meta's loaders expect an output matrix even when it is shared
        yield "lm_head.weight", state["embed_tokens.weight"]


def _is_llama3_family(config: ModelConfig) -> bool:
    """Whether Meta's Llama 3 code (rather than Llama 1/2's) is the one that loads this model."""
    return config.rope_theta != 10000.0 or config.use_scaled_rope


def _embedding_split(config: ModelConfig, shards: int) -> int:
    """Llama 3 code splits the embedding by vocabulary (dim 0), Llama 1/2 code by width (dim 1)."""
    preferred, other = (0, 1) if _is_llama3_family(config) else (1, 0)
    return preferred if config.embedding_size(preferred) % shards == 0 else other


def _check_shardable(config: ModelConfig, shards: int) -> None:
    if not isinstance(shards, int) or shards < 1:
        raise CheckpointError(f"the shard count must be a positive integer, got {shards!r}")
    undivided = _undivided(config, shards)
    if undivided:
        counts = [n for n in range(1, config.kv_heads + 1) if not _undivided(config, n)]
        raise CheckpointError(f"cannot split this model into {shards} shards: {shards} does not divide "
                              f"{', '.join(undivided)}; shard counts that divide them all: "
                              f"{', '.join(map(str, counts))}")


def _undivided(config: ModelConfig, shards: int) -> list[str]:
    """The sizes that `shards` equal model-parallel pieces would need to divide, but does not."""
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "hidden_dim": config.ffn_hidden_dim}
    undivided = [f"{k}={v}" for k, v in sizes.items() if v % shards]
    if config.vocab_size % shards and config.dim % shards:  # the embedding splits along either
        undivided.append(f"vocab_size={config.vocab_size} or dim={config.dim} (the embedding is split along one)")
    return undivided


def params_json(config: ModelConfig) -> dict:
    """Meta's params.json for `config`, expressing the MLP width through multiple_of/ffn_dim_multiplier."""
    multiple_of, multiplier = config.multiple_of, config.ffn_dim_multiplier
    if meta_hidden_dim(config.dim, multiple_of, multiplier) != config.ffn_hidden_dim:
        multiple_of, multiplier = meta_ffn_params(config.dim, config.ffn_hidden_dim)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.kv_heads, "vocab_size": config.vocab_size, "multiple_of": multiple_of,
              "ffn_dim_multiplier": multiplier, "norm_eps": config.norm_eps}
    if _is_llama3_family(config):  # Llama 1/2's ModelArgs rejects these keys; Llama 3's expects them
        params.update(rope_theta=config.rope_theta, use_scaled_rope=config.use_scaled_rope)
    s = config.rope_scaling
    if config.use_scaled_rope and s != RopeScaling():  # non-default scaling, e.g. Llama 3.2's factor 32
        params.update(rope_scaling_factor=s.factor, low_freq_factor=s.low_freq_factor,
                      high_freq_factor=s.high_freq_factor, original_max_seq_len=s.original_max_seq_len)
    return params
