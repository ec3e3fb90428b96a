"""Detect a checkpoint's format from its files and load it into a Transformer without double memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llamakit.checkpoint import gguf, hf, llama2c, meta
from llamakit.checkpoint.io import check_state_dict, read_json
from llamakit.checkpoint.peft import base_transforms, is_reward_adapter, load_adapter
from llamakit.checkpoint.transforms import Transform, apply_transforms, from_records, owned_dtypes
from llamakit.errors import CheckpointError, ConfigError
from llamakit.model.config import ModelConfig, resolve_dtype
from llamakit.model.llama import Transformer
from llamakit.model.quantize import Int4
from llamakit.model.reward import RewardHead, is_reward_model
from llamakit.tokenizer import TOKENIZER_FILES, Tokenizer, check_vocab, load_tokenizer

NATIVE_KEY = "llamakit"  # config.json block that marks (and exactly describes) our own format
NATIVE_VERSION = 1


def detect_format(path: str | Path) -> str:
    """'llamakit', 'hf', 'meta', 'llama2c' or 'gguf', decided from the files' content, never their names."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; pass the path of a checkpoint folder "
                              "(Meta, Hugging Face or llamakit), of a llama2.c .bin file or of a .gguf file")
    if path.is_file():
        if gguf.is_gguf(path):
            return "gguf"
        if llama2c.read_header(path) is not None:
            return "llama2c"
        raise CheckpointError(f"{path}: not a recognised checkpoint file; pass a llama2.c .bin file, a GGUF file, or "
                              "the folder holding config.json (Hugging Face/llamakit) or params.json (Meta)")
    if (path / "config.json").is_file():
        return "llamakit" if NATIVE_KEY in read_json(path / "config.json") else "hf"
    if (path / "params.json").is_file():
        return "meta"
    candidates = _llama2c_files(path)
    if len(candidates) == 1:
        return "llama2c"
    if len(candidates) > 1:
        raise CheckpointError(f"{path}: several llama2.c model files ({', '.join(p.name for p in candidates)}); "
                              "pass the one you want")
    raise CheckpointError(f"{path}: no checkpoint found; expected config.json + *.safetensors (Hugging Face or "
                          "llamakit), params.json + consolidated.NN.pth (Meta), or one llama2.c .bin file")


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our names, stored dtype, CPU, memory-mapped where the format allows)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "meta":
        return meta.read_meta(path)
    if fmt == "llama2c":
        return llama2c.read_llama2c(_llama2c_file(path))
    if fmt == "gguf":
        return gguf.read_gguf(path)
    config = _read_config(path, fmt)
    state = {}
    for name, tensor in hf.read_hf_state(path, config):
        if name in state:
            raise CheckpointError(f"{path}: weight {name} appears in two files; the shard index is damaged")
        state[name] = tensor
    return config, state


def load_config(path: str | Path) -> ModelConfig:
    """The model configuration of a checkpoint, read without loading its weights."""
    path = Path(path)
    return _read_config(path, detect_format(path))


def _read_config(path: Path, fmt: str) -> ModelConfig:
    if fmt == "llamakit":
        return _native_config(path / "config.json")
    if fmt == "hf":
        return hf.config_from_hf(read_json(path / "config.json"), path / "config.json")
    if fmt == "llama2c":
        return llama2c.read_header(_llama2c_file(path))[1]
    if fmt == "gguf":
        return gguf.read_gguf_config(path)
    return meta.read_meta_config(path)


def _native_config(file: Path) -> ModelConfig:
    block = read_json(file)[NATIVE_KEY]
    version = block.get("format_version") if isinstance(block, dict) else None
    if version != NATIVE_VERSION or not isinstance(block.get("model"), dict):
        raise CheckpointError(f"{file}: the 'llamakit' block (format version {version!r}) is not one this llamakit "
                              f"reads (version {NATIVE_VERSION}); upgrade llamakit, or delete the block to load it "
                              "as a plain Hugging Face checkpoint")
    try:
        return ModelConfig.from_dict(block["model"])
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               transforms: Sequence[Transform] = ()) -> Transformer:
    """A Transformer in eval mode with the checkpoint's weights (dtype None keeps the stored dtype).

    The transforms the checkpoint records, then `transforms`, swap modules while the model is on the meta device;
    each of `transforms` also converts the stored tensors (e.g. quantizes them, one at a time). The tensors the
    transforms own are checked against their shapes and keep their own dtype.
    """
    path = Path(path)
    config, state = _read_for(path, transforms)
    with torch.device("meta"):
        model = Transformer(config)  # no memory: the loaded tensors become the parameters (assign=True)
        model = apply_transforms(model, _recorded_transforms(path))  # the stored tensors are already theirs
    for transform in transforms:
        with torch.device("meta"):
            model = apply_transforms(model, [transform])
        state = transform.convert(model, state)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, path)
    owned = owned_dtypes(model)
    dtype = resolve_dtype(dtype) or state["embed_tokens.weight"].dtype
    for name in state:  # one tensor at a time, so converting never holds two copies of the model
        state[name] = state[name].to(device=device, dtype=owned.get(name, dtype))
    model.load_state_dict(state, assign=True)
    model.init_buffers()
    return model.eval().requires_grad_(False)


def _read_for(path: Path, transforms: Sequence[Transform]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """read_checkpoint, except that a GGUF's Q4_0 matrices load straight into Int4Linear when int4 in groups of 32
    (Q4_0's blocks) is the first transform: its convert() then quantizes only the matrices stored otherwise."""
    first = transforms[0] if transforms else None
    if isinstance(first, Int4) and first.group_size == 32 and detect_format(path) == "gguf":
        return gguf.read_gguf(path, int4=True)
    return read_checkpoint(path)


def _recorded_transforms(path: Path) -> list[Transform]:
    """The transforms a llamakit folder's config.json records; a Hugging Face reward model (one-label
    LlamaForSequenceClassification) is the reward head's; other formats record none."""
    fmt = detect_format(path)
    if fmt == "hf":
        return [RewardHead()] if hf.is_reward_config(read_json(path / "config.json"), path / "config.json") else []
    if fmt != "llamakit":
        return []
    return from_records(read_json(path / "config.json")[NATIVE_KEY].get("transforms", []), path / "config.json")


def load_reward_model(path: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | str | None = None,
                      device: torch.device | str = "cpu") -> Transformer:
    """A reward model in eval mode, returning (B, T, 1) scores (model/reward.py): a whole one (`llamakit reward`
    with method full, or Hugging Face's one-label LlamaForSequenceClassification), or the base it was trained from
    plus its adapter (method lora, or any PEFT SEQ_CLS LoRA adapter: the LoRA weights and the score head)."""
    if adapter is not None and not is_reward_adapter(adapter):
        raise CheckpointError(f"{adapter}: a language model's adapter, not a reward model's (its task_type is not "
                              "SEQ_CLS); pass the final/ of `llamakit reward` with method.name lora")
    model = load_model(path, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)
    if not is_reward_model(model):
        raise CheckpointError(f"{path}: a language model, not a reward model; pass the final/ of `llamakit reward`, "
                              "or the base model with the reward adapter it was trained with (adapter=...)")
    return model


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer file stored with a checkpoint folder, if any; a GGUF's vocabulary as a file llamakit reads."""
    path = Path(path)
    if path.is_file() and gguf.is_gguf(path):
        return gguf.gguf_tokenizer(path)
    if path.is_dir():
        return next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
    return None


def load_checkpoint(path: str | Path, tokenizer: str | Path | None = None, dtype=None,
                    device: torch.device | str = "cpu", adapter: str | Path | None = None,
                    transforms: Sequence[Transform] = (), mesh=None) -> tuple[Transformer, Tokenizer]:
    """Model (with a fine-tuned adapter applied, if given, then the transforms) and tokenizer (given, or found
    beside the weights), checked to share a vocabulary. With a 1-D DeviceMesh `mesh` of several processes, the
    model is split over them by tensor parallelism (checkpoint/sharded.py), each reading only its share."""
    if mesh is not None and mesh.size() > 1:
        return _load_tensor_parallel(path, tokenizer, dtype, device, adapter, transforms, mesh)
    config = load_config(path)  # first: a wrong path is reported as such, not as a missing tokenizer
    tok = _tokenizer_for(path, tokenizer, config)
    # A QLoRA adapter's base is quantized to NF4 as it is read, as in training; other transforms come after LoRA.
    model = load_model(path, dtype=dtype, device=device, transforms=base_transforms(adapter) if adapter else transforms)
    if adapter is not None:  # then the transforms swap the adapted model's layers: LoRA wraps plain projections
        load_adapter(model, adapter)
        model = apply_transforms(model, transforms)
    return model, tok


def _tokenizer_for(path: str | Path, tokenizer: str | Path | None, config: ModelConfig) -> Tokenizer:
    tokenizer_path = tokenizer or find_tokenizer(path)
    if tokenizer_path is None:
        raise CheckpointError(f"{path}: no tokenizer.model beside the weights; pass the tokenizer file explicitly")
    tok = load_tokenizer(tokenizer_path)
    check_vocab(tok, config.vocab_size, str(path))
    return tok


def _load_tensor_parallel(path, tokenizer, dtype, device, adapter, transforms, mesh) -> tuple[Transformer, Tokenizer]:
    from llamakit.checkpoint.sharded import load_model_tensor_parallel  # it builds on this module

    if adapter is not None or transforms:
        raise ConfigError("tensor parallelism runs plain checkpoints: merge the adapter first (llamakit merge) "
                          "and leave out --quantize")
    detect_format(path)  # first: a wrong path is reported as such, not as a missing tokenizer
    model = load_model_tensor_parallel(path, mesh, dtype, device)
    return model, _tokenizer_for(path, tokenizer, model.config)


def _llama2c_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.bin")) if p.is_file() and llama2c.read_header(p) is not None]


def _llama2c_file(path: Path) -> Path:
    return path if path.is_file() else _llama2c_files(path)[0]
