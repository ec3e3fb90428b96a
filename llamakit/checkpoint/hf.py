"""Hugging Face Llama checkpoints: config.json + model.safetensors (or a sharded index).

Our module names are HF's without the "model." prefix, and both use the rotate-half RoPE layout,
so converting is only a rename.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llamakit.checkpoint.io import read_json, torch_load, write_json
from llamakit.errors import CheckpointError, ConfigError
from llamakit.model.config import ModelConfig, RopeScaling

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # a buffer some old exports saved; recomputed by us
SCORER = "LlamaForSequenceClassification"  # with one label: a reward model, its score.weight our ScoreHead's


def config_from_hf(hf: dict, where: Path) -> ModelConfig:
    """ModelConfig from a transformers LlamaConfig dict (v4 rope_scaling or v5 rope_parameters)."""
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type {hf['model_type']!r} is not supported; llamakit loads Llama models")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not a Llama architecture (expected {ok!r})")
    try:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        config = ModelConfig(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], n_kv_heads=hf.get("num_key_value_heads"), hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e4)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False), **_rope_scaling_from_hf(rope, where))
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}; is this a Llama config.json?") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if hf.get("head_dim") not in (None, config.head_dim):
        raise CheckpointError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    return config


def is_reward_config(hf: dict, where: Path) -> bool:
    """Whether a config.json describes a reward model: LlamaForSequenceClassification with one label."""
    if SCORER not in (hf.get("architectures") or []):
        return False
    labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)  # transformers' default: 2
    if labels != 1:
        raise CheckpointError(f"{where}: a {SCORER} with {labels} labels; llamakit loads only one-label ones "
                              "(reward models: one score per sequence)")
    return True


def _rope_scaling_from_hf(rope: dict, where: Path) -> dict:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "llama3":
        raise CheckpointError(f"{where}: RoPE scaling type {kind!r} is not supported (only Llama 3.1's 'llama3')")
    return {"use_scaled_rope": True, "rope_scaling": RopeScaling(
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"], original_max_seq_len=rope["original_max_position_embeddings"])}


def config_to_hf(config: ModelConfig, dtype: torch.dtype, bos_id: int | None = None,
                 eos_id: int | None = None) -> dict:
    """A transformers LlamaConfig dict (v4 field names, which v5 still reads)."""
    s = config.rope_scaling
    rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_seq_len} if config.use_scaled_rope else None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_hf_state(folder: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) for every weight in the folder's safetensors (or torch .bin) files."""
    for file in _weight_files(folder):
        for hf_name, tensor in _read_file(file):
            if hf_name.endswith(IGNORED_KEYS):
                continue
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied exports store the shared matrix twice
            if hf_name == "score.weight":  # a reward model's head, our lm_head once the reward head is swapped in
                hf_name = "lm_head.weight"
            yield hf_name.removeprefix("model."), tensor


def _weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index_name}: no 'weight_map'; the index file is damaged")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{file}: listed in {index_name} but missing; the download is incomplete")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"{folder}: config.json found but no weights (model.safetensors, "
                          f"{SAFETENSORS_INDEX} or pytorch_model.bin)")


def _read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix != ".safetensors":
        yield from torch_load(file).items()
        return
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is damaged or truncated") from None


def write_hf_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Write `state` (our names) as HF safetensors, split into shards of at most max_shard_bytes."""
    hf_state = {_hf_name(name): t.contiguous() for name, t in state.items()}
    shards, current, size = [], {}, 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _hf_name(name: str) -> str:
    return name if name in ("lm_head.weight", "score.weight") else f"model.{name}"
