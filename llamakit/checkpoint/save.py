"""Write a model in our format, Hugging Face's, Meta's (any shard count), llama2.c's or GGUF; always atomically."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from llamakit.checkpoint import gguf, hf, llama2c, meta
from llamakit.checkpoint.io import atomic_directory, atomic_file, write_json
from llamakit.checkpoint.load import NATIVE_KEY, NATIVE_VERSION
from llamakit.checkpoint.transforms import applied, owned_dtypes
from llamakit.errors import CheckpointError
from llamakit.model.config import ModelConfig, resolve_dtype
from llamakit.model.llama import Transformer
from llamakit.tokenizer import Tokenizer, check_vocab, load_tokenizer

log = logging.getLogger(__name__)
FORMATS = ("llamakit", "hf", "meta", "llama2c", "gguf")


def save_model(model: Transformer, path: str | Path, format: str = "llamakit", *,
               tokenizer: Tokenizer | str | Path | None = None, dtype: torch.dtype | str | None = None,
               shards: int = 1, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
               gguf_type: str | None = None) -> Path:
    """Write `model` (and its tokenizer file) to `path`; nothing appears at `path` unless it all succeeds.

    A GGUF file holds its tokenizer; gguf_type is its tensor type (f32, f16, bf16, q8_0, q4_0; default: the float
    type the weights are in after `dtype`)."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    if gguf_type is not None and format != "gguf":
        raise CheckpointError(f"a GGUF type ({gguf_type}) applies to format 'gguf' only, not {format!r}")
    path, config = Path(path), model.config
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if tok is not None:
        check_vocab(tok, config.vocab_size, "the model being saved")
    transforms = [t.to_dict() for t in applied(model)]
    # A reward model is one transform Hugging Face has a class for: written as LlamaForSequenceClassification.
    scorer = [t["name"] for t in transforms] == ["reward_head"] and format == "hf"
    if transforms and format != "llamakit" and not scorer:
        raise CheckpointError(f"the model was transformed ({', '.join(t['name'] for t in transforms)}), which only "
                              "the llamakit format records; save it with format 'llamakit'")
    dtype, owned = resolve_dtype(dtype), owned_dtypes(model)  # a transform's tensors keep their own dtype
    state = {name: t.detach().to("cpu", t.dtype if name in owned else dtype or t.dtype)
             for name, t in model.state_dict().items()}
    if format == "llama2c":
        with atomic_file(path, overwrite=overwrite) as tmp:
            llama2c.write_llama2c(tmp, config, state)
        return path
    if format == "gguf":
        if tok is None:
            log.warning("saving %s without a tokenizer; llama.cpp cannot run it, llamakit needs --tokenizer", path)
        kind = gguf_type or {torch.float16: "f16", torch.bfloat16: "bf16"}.get(state["embed_tokens.weight"].dtype, "f32")
        with atomic_file(path, overwrite=overwrite) as tmp:
            gguf.write_gguf(tmp, config, state, tok, kind)
        return path
    with atomic_directory(path, overwrite=overwrite) as tmp:
        if format == "meta":
            meta.write_meta(tmp, config, state, shards)
        else:
            _write_hf_layout(tmp, config, state, tok, max_shard_bytes, native=format == "llamakit",
                             transforms=transforms, scorer=scorer)
        if tok is not None:
            shutil.copyfile(tok.path, tmp / "tokenizer.model")
        elif format == "llamakit":
            log.warning("saving %s without a tokenizer; generation from it will need --tokenizer", path)
    return path


def write_native(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer | None,
                 transforms: list[dict] | None = None) -> None:
    """Our format's files (config, safetensors, tokenizer, the transforms' records) into an existing folder; the
    caller makes it atomic."""
    _write_hf_layout(folder, config, state, tok, 5 * 2**30, native=True, transforms=transforms)
    if tok is not None:
        shutil.copyfile(tok.path, folder / "tokenizer.model")


def _write_hf_layout(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer | None,
                     max_shard_bytes: int, native: bool, transforms: list[dict] | None = None,
                     scorer: bool = False) -> None:
    dtype = state["embed_tokens.weight"].dtype
    hf_config = hf.config_to_hf(config, dtype, tok.bos_id if tok else None, tok.eos_id if tok else None)
    if scorer:  # transformers reads the score at the last token that is not pad_token_id
        hf_config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                         pad_token_id=tok.pad_id if tok else None)
        state = {("score.weight" if name == "lm_head.weight" else name): t for name, t in state.items()}
    if native:  # transformers ignores this block; we read the exact config (multiple_of etc.) from it
        hf_config[NATIVE_KEY] = {"format_version": NATIVE_VERSION, "model": config.to_dict()}
        if transforms:  # applied again by load_model, before the weights are assigned
            hf_config[NATIVE_KEY]["transforms"] = transforms
    hf.write_hf_weights(folder, state, max_shard_bytes)
    write_json(folder / "config.json", hf_config)
