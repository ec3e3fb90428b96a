"""Adapters in PEFT's format: adapter_config.json + adapter_model.safetensors with PEFT's key names.

`peft.PeftModel.from_pretrained` loads them onto the Hugging Face version of the base model, and we load
adapters PEFT wrote. LoRA keys are our module names under `base_model.model.model.`; prefix and prompt
tuning store one `prompt_embeddings` matrix. The safetensors metadata records the base's shape, so an
adapter cannot be loaded onto a different model by mistake, and the prompt format it was tuned with (alpaca,
llama2, llama3), so chat prompts as it learned.

A reward model's LoRA adapter is PEFT's sequence classification (task_type SEQ_CLS, for
LlamaForSequenceClassification): the new score head (our lm_head, a ScoreHead) trains whole and is saved beside the
LoRA weights as `base_model.model.score.weight` (modules_to_save ["score"]); loading it makes a reward model.

A QLoRA adapter is a plain LoRA adapter (PEFT loads it onto the unquantized base) whose metadata also records that
the base was trained with its projections in NF4: loading it here quantizes the base the same way first, so the
model is the one that was trained, and merging it folds the update into the dequantized NF4 weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llamakit.checkpoint.io import atomic_directory, read_json, write_json
from llamakit.checkpoint.transforms import Transform, apply_transforms, from_records
from llamakit.errors import CheckpointError
from llamakit.model import Transformer
from llamakit.model.config import CHAT_FORMATS
from llamakit.model.llama import apply_rope, rope_cos_sin
from llamakit.model.lora import LoRAConfig, apply_lora, lora_modules
from llamakit.model.nf4 import NF4, nf4_transform
from llamakit.model.prefix import PrefixConfig, PrefixKV, apply_prefix_tuning, apply_prompt_tuning
from llamakit.model.reward import apply_reward_head, is_reward_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LORA_PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
HEAD, SCORE = "lm_head.weight", "base_model.model.score.weight"  # a reward model's head: ours, PEFT's (SEQ_CLS)
CLASSIFIER_MODULES = {"score", "classifier"}  # PEFT's SEQ_CLS modules_to_save: each architecture's head name
CHAT_FORMAT = "llamakit_chat_format"  # metadata: the model's chat_format while it was tuned (llama2, llama3, alpaca)
BASE_QUANTIZATION = "llamakit_base_quantization"  # metadata: QLoRA's record of the NF4 transform of the base


def adapter_method(model: nn.Module) -> str | None:
    """Which adapter the model carries: lora, prefix, prompt, or None."""
    if lora_modules(model):
        return "lora"
    if hasattr(model, "soft_prompt"):
        return "prompt"
    if any(isinstance(m, PrefixKV) for m in model.modules()):
        return "prefix"
    return None


def save_adapter(folder: str | Path, model: Transformer, method_cfg: LoRAConfig | PrefixConfig,
                 base: str | None = None, overwrite: bool = False) -> Path:
    """Write the model's adapter (and nothing of the frozen base) as a PEFT adapter folder, atomically."""
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        write_adapter(tmp, model, method_cfg, adapter_params(model), base)
    return folder


def write_adapter(folder: Path, model: Transformer, method_cfg: LoRAConfig | PrefixConfig,
                  state: dict[str, torch.Tensor], base: str | None = None) -> None:
    """Write adapter files into an existing folder; state holds the adapter tensors under our names."""
    config = _peft_config(model, adapter_method(model), method_cfg, base)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in to_peft(state, model).items()}
    metadata = {"format": "pt", "llamakit_base": json.dumps(_base(model))}
    if model.config.chat_format:
        metadata[CHAT_FORMAT] = model.config.chat_format
    if (nf4 := nf4_transform(model)) is not None:
        metadata[BASE_QUANTIZATION] = json.dumps(nf4.to_dict())
    write_json(folder / CONFIG, config)
    save_file(tensors, folder / WEIGHTS, metadata=metadata)


def _peft_config(model: Transformer, method: str | None, cfg, base: str | None) -> dict:
    scorer = is_reward_model(model)
    if scorer and method != "lora":
        raise CheckpointError(f"a reward model's adapter must be LoRA (saved with its score head), not {method}")
    common = {"task_type": "SEQ_CLS" if scorer else "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": base, "revision": None}
    c = model.config
    if method == "lora":
        return {**common, "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": ["score"] if scorer else None, "init_lora_weights": True, "use_rslora": False,
                "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}}
    prompt = {"num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1, "num_layers": c.n_layers}
    if method == "prompt":
        return {**common, **prompt, "peft_type": "PROMPT_TUNING", "token_dim": c.dim,
                "num_attention_heads": c.n_heads, "prompt_tuning_init": "RANDOM"}
    if method == "prefix":  # PEFT sizes a GQA model's prefix by its key/value heads
        kv_dim = c.kv_heads * c.head_dim
        return {**common, **prompt, "peft_type": "PREFIX_TUNING", "token_dim": kv_dim,
                "num_attention_heads": c.kv_heads, "encoder_hidden_size": kv_dim, "prefix_projection": False}
    raise CheckpointError("the model carries no adapter to save; apply LoRA, prefix or prompt tuning first")


def _base(model: Transformer) -> dict:
    c = model.config
    return {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.kv_heads,
            "hidden_dim": c.ffn_hidden_dim, "vocab_size": c.vocab_size}


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors under our module names (the frozen base excluded; a reward model's head included)."""
    head = is_reward_model(model)
    return {name: p for name, p in model.named_parameters() if _is_adapter(name, head)}


def _is_adapter(name: str, head: bool) -> bool:
    return ".lora_" in name or name.startswith("soft_prompt.") or ".prefix." in name or (head and name == HEAD)


def to_peft(state: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """Adapter tensors under our names -> PEFT's names (what adapter_model.safetensors holds)."""
    head = is_reward_model(model)
    state = {k: v for k, v in state.items() if _is_adapter(k, head)}
    if "soft_prompt.embedding" in state:
        return {"prompt_embeddings": state["soft_prompt.embedding"]}
    if any(".prefix." in k for k in state):
        return {"prompt_embeddings": _prefix_to_peft(model, state)}
    return {(SCORE if k == HEAD else LORA_PREFIX + k): v for k, v in state.items()}


def from_peft(state: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """PEFT's names -> ours, for a model that already carries the (empty) adapter."""
    method = adapter_method(model)
    if method == "prompt":
        return {"soft_prompt.embedding": state["prompt_embeddings"]}
    if method == "prefix":
        return _prefix_from_peft(model, state["prompt_embeddings"].float())
    return {(HEAD if k == SCORE else k.removeprefix(LORA_PREFIX)): v for k, v in state.items()}


def _rotation(model: Transformer, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.tensor([position], device=model.inv_freq.device)
    return rope_cos_sin(model.inv_freq, positions, torch.float32)  # (1, D) each


def _prefix_to_peft(model: Transformer, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our per-layer prefixes as PEFT's (P, L * 2 * KV * D) matrix.

    Our text starts at position 0 with un-rotated prefix keys; in Hugging Face the text follows the P
    prefix slots, at positions P.. . Rotating the keys by P positions makes the attention scores equal.
    """
    layers = []
    for i in range(model.config.n_layers):
        key, value = state[f"layers.{i}.self_attn.prefix.key"], state[f"layers.{i}.self_attn.prefix.value"]
        cos, sin = _rotation(model, key.size(1))
        key = apply_rope(key.float(), cos.to(key.device), sin.to(key.device))  # (KV, P, D)
        layers.append(torch.stack((key, value.float())).permute(2, 0, 1, 3))  # (P, 2, KV, D)
    return torch.stack(layers, dim=1).flatten(1)  # (P, L * 2 * KV * D)


def _prefix_from_peft(model: Transformer, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    c = model.config
    P = matrix.size(0)
    per_layer = matrix.view(P, c.n_layers, 2, c.kv_heads, c.head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, KV, P, D)
    cos, sin = _rotation(model, -P)
    state = {}
    for i, (key, value) in enumerate(per_layer):
        state[f"layers.{i}.self_attn.prefix.key"] = apply_rope(key, cos.to(key.device), sin.to(key.device))
        state[f"layers.{i}.self_attn.prefix.value"] = value
    return state


def load_adapter(model: Transformer, folder: str | Path) -> str:
    """Apply the adapter in folder (PEFT format) to model, in eval mode, with the chat format it was tuned with
    (when recorded) as the model's; returns lora, prefix or prompt. A reward adapter (SEQ_CLS) also swaps in the
    score head it carries: the model becomes a reward model."""
    folder = Path(folder)
    config = _read_config(folder)
    state, base, chat_format = _read_weights(folder)
    if base is not None and base != _base(model):
        diff = ", ".join(f"{k}={base[k]} (this model: {v})" for k, v in _base(model).items() if base.get(k) != v)
        raise CheckpointError(f"{folder}: this adapter was trained on a different base model ({diff}); load it "
                              "onto the model it was trained from")
    method = METHODS[config["peft_type"]]
    _quantize_like_training(model, folder)
    if config.get("task_type") == "SEQ_CLS" and not is_reward_model(model):
        apply_reward_head(model)  # before LoRA, which freezes it; the adapter's score weights replace its init
    _apply(model, method, config, folder)
    with torch.no_grad():
        model.load_state_dict(read_adapter_weights(folder, model), strict=False)
    if chat_format:
        model.config = model.config.replace(chat_format=chat_format)
    model.eval()
    return method


def base_transforms(folder: str | Path) -> list[Transform]:
    """What the adapter's base went through before training: [NF4] for a QLoRA adapter, else nothing. Passed to
    load_model, the base is quantized from its stored weights as they are read, exactly as training did."""
    folder = Path(folder)
    _read_config(folder)  # an adapter folder at all: the error names the config a folder needs first
    record = _read_metadata(folder).get(BASE_QUANTIZATION)
    if record is None:
        return []
    try:
        transforms = from_records([json.loads(record)], folder / WEIGHTS)
    except json.JSONDecodeError:
        transforms = []
    if [type(t) for t in transforms] != [NF4]:
        raise CheckpointError(f"{folder / WEIGHTS}: the recorded base quantization {record!r} is not an NF4 record; "
                              "the file is damaged")
    return transforms


def _quantize_like_training(model: Transformer, folder: Path) -> None:
    """Quantize the base as the adapter's training did (QLoRA: NF4), unless load_model already did. Here the loaded
    weights are quantized: the same codes as training when they were loaded in their stored dtype (or in fp32)."""
    wanted, have = base_transforms(folder), nf4_transform(model)
    if not wanted:
        return
    if have is not None and have != wanted[0]:
        raise CheckpointError(f"{folder}: a QLoRA adapter trained on an NF4 base with {wanted[0]}, but this model "
                              f"was quantized with {have}; load the base without quantization")
    if have is None:
        apply_transforms(model, wanted)


def read_adapter_config(folder: str | Path) -> LoRAConfig | PrefixConfig:
    """The method settings an adapter folder was trained with."""
    config = _read_config(Path(folder))
    if config["peft_type"] == "LORA":
        return LoRAConfig(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                          targets=tuple(config["target_modules"]))
    return PrefixConfig(num_virtual_tokens=config["num_virtual_tokens"])


def is_reward_adapter(folder: str | Path) -> bool:
    """Whether the adapter folder holds a reward model's adapter (PEFT's SEQ_CLS: LoRA and a score head)."""
    return _read_config(Path(folder)).get("task_type") == "SEQ_CLS"


def _read_config(folder: Path) -> dict:
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG}; --adapter takes a folder written by `llamakit finetune` "
                              "with a LoRA/prefix/prompt method (or by PEFT)")
    config = read_json(folder / CONFIG)
    kind = config.get("peft_type")
    if kind not in METHODS:
        raise CheckpointError(f"{folder}: peft_type {kind!r} is not supported; llamakit loads "
                              f"{', '.join(METHODS)} adapters")
    seq_cls = config.get("task_type") == "SEQ_CLS"
    if seq_cls and kind != "LORA":
        raise CheckpointError(f"{folder}: a {kind} sequence-classification adapter is not supported; llamakit's "
                              "reward adapters are LoRA (with the score head)")
    # A SEQ_CLS adapter saves its head whole (modules_to_save); any other module saved whole is not supported.
    saved = set(config.get("modules_to_save") or ()) - (CLASSIFIER_MODULES if seq_cls else set())
    unsupported = [k for k in ("use_dora", "use_rslora", "layers_to_transform", "prefix_projection") if config.get(k)]
    unsupported += [f"modules_to_save {sorted(saved)}"] if saved else []
    if unsupported or (kind == "LORA" and not isinstance(config.get("target_modules"), list)):
        what = ", ".join(unsupported) or "target_modules given as a pattern"
        raise CheckpointError(f"{folder}: {what} is not supported; use a plain adapter (or merge it with PEFT)")
    return config


def _read_metadata(folder: Path) -> dict[str, str]:
    """The adapter weights file's metadata (without reading its tensors)."""
    try:
        with safe_open(folder / WEIGHTS, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # missing or damaged file
        raise CheckpointError(f"{folder / WEIGHTS}: cannot read the adapter weights ({e})") from None


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict | None, str | None]:
    """The adapter tensors (PEFT's names) and what our metadata records, if any: the base's shape, the chat format."""
    try:
        with safe_open(folder / WEIGHTS, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            metadata = f.metadata() or {}
    except Exception as e:  # missing or damaged file
        raise CheckpointError(f"{folder / WEIGHTS}: cannot read the adapter weights ({e})") from None
    chat_format, base = metadata.get(CHAT_FORMAT), metadata.get("llamakit_base")
    if chat_format not in CHAT_FORMATS:
        raise CheckpointError(f"{folder / WEIGHTS}: the recorded chat format {chat_format!r} is not one of "
                              f"{', '.join(f for f in CHAT_FORMATS if f)}")
    return state, json.loads(base) if base else None, chat_format


def _apply(model: Transformer, method: str, config: dict, folder: Path) -> None:
    try:
        if method == "lora":
            apply_lora(model, read_adapter_config(folder))
        elif method == "prefix":
            apply_prefix_tuning(model, PrefixConfig(config["num_virtual_tokens"]))
        else:
            apply_prompt_tuning(model, PrefixConfig(config["num_virtual_tokens"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: malformed adapter config ({e})") from None


def read_adapter_weights(folder: str | Path, model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter tensors in folder under our names, checked against the adapter model already carries."""
    folder = Path(folder)
    state, _, _ = _read_weights(folder)
    if SCORE in state and state[SCORE].size(0) != 1:
        raise CheckpointError(f"{folder}: its score head has {state[SCORE].size(0)} outputs, a classifier's; a "
                              "reward model gives one score (num_labels=1)")
    # Plain tensors of the global shapes: the parameters may be FSDP shards on another device.
    expected = to_peft({k: torch.zeros(v.shape) for k, v in adapter_params(model).items()}, model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: adapter tensors do not match this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); was it trained on another base?")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(tensor.shape)} but this model needs "
                                  f"{tuple(expected[name].shape)}; load the adapter onto the base it was trained on")
    return from_peft(state, model)
