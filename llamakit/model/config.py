"""ModelConfig: the architecture of one Llama model, in the vocabulary of Meta's params.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llamakit.errors import ConfigError

CHAT_FORMATS = (None, "llama2", "llama3", "alpaca")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling: long wavelengths are stretched by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_number(f"rope_scaling.{name}", getattr(self, name), float)
        _check_number("rope_scaling.original_max_seq_len", self.original_max_seq_len, int)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"model config: rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")


def _check_number(name: str, value, kind: type) -> None:
    """value is a positive int (kind=int) or a positive int/float (kind=float); bools are not numbers."""
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or not value > 0:
        raise ConfigError(f"model config: {name} must be a positive {'integer' if kind is int else 'number'}, "
                          f"got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama transformer (field names follow Meta's params.json)."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU width; None: Meta's rule (see ffn_hidden_dim)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # used when use_scaled_rope
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    chat_format: str | None = None  # the prompt format it was tuned on: llama2, llama3, alpaca; None: the tokenizer's

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            _check_number(name, getattr(self, name), int)
        for name in ("n_kv_heads", "hidden_dim"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), int)
        for name in ("norm_eps", "rope_theta") + (("ffn_dim_multiplier",) if self.ffn_dim_multiplier else ()):
            _check_number(name, getattr(self, name), float)
        if not isinstance(self.use_scaled_rope, bool) or not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("model config: use_scaled_rope and tie_word_embeddings must be true or false")
        if self.chat_format not in CHAT_FORMATS:
            raise ConfigError(f"model config: chat_format={self.chat_format!r} is not one of {CHAT_FORMATS}")
        if self.kv_heads > self.n_heads:
            raise ConfigError(f"model config: n_kv_heads={self.kv_heads} exceeds n_heads={self.n_heads}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Width of the SwiGLU MLP: explicit, or Meta's rule (2/3 * 4 * dim, scaled, rounded up)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        return meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_params(self) -> int:
        """Parameter count, counting tied input/output embeddings once."""
        d, h, kv = self.dim, self.head_dim, self.kv_heads
        attention = d * self.n_heads * h * 2 + d * kv * h * 2  # q, o and k, v
        mlp = 3 * d * self.ffn_hidden_dim
        per_layer = attention + mlp + 2 * d  # two RMSNorm weights
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + embeddings + d

    def embedding_size(self, dim: int) -> int:
        """Size of the embedding matrix (vocab_size, dim) along `dim`."""
        return (self.vocab_size, self.dim)[dim]

    def kv_cache_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of K and V cached per token, over all layers."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a dict of our own field names; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:  # missing required field
            raise ConfigError(f"model config: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A published size by name, e.g. "llama3.1-8b" (see PRESETS)."""
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim (same FLOPs as a 4*dim MLP), scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give `hidden_dim`: for writing params.json."""
    multiple_of = 1
    while multiple_of < 4096 and hidden_dim % (multiple_of * 2) == 0:
        multiple_of *= 2
    if meta_hidden_dim(dim, multiple_of, None) == hidden_dim:
        return multiple_of, None
    exact = (hidden_dim + 0.5) / int(2 * (4 * dim) / 3)
    for digits in range(1, 18):  # the shortest multiplier that works, e.g. 1.3 rather than 1.3125...
        multiplier = round(exact, digits)
        if meta_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
            return multiple_of, multiplier
    raise ConfigError(f"cannot express hidden_dim={hidden_dim} for dim={dim} in params.json terms")


def _llama1(dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000, norm_eps=1e-6,
                       max_seq_len=2048)


def _llama2(dim: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000, norm_eps=1e-5,
                       max_seq_len=4096, **kw)


def _llama3(dim: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    kw = {"n_kv_heads": 8, "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "max_seq_len": 8192, **kw}
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=128256, norm_eps=1e-5,
                       rope_theta=500000.0, **kw)


def _llama31(dim: int, n_layers: int, n_heads: int, factor: float = 8.0, **kw) -> ModelConfig:
    return _llama3(dim, n_layers, n_heads, use_scaled_rope=True, max_seq_len=131072,
                   rope_scaling=RopeScaling(factor=factor), **kw)


def _tinyllama(dim: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    # karpathy/tinyllamas, trained with llama2.c: multiple_of=32, shared classifier
    kw = {"vocab_size": 32000, "multiple_of": 32, "max_seq_len": 1024, **kw}
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, tie_word_embeddings=True, **kw)


PRESETS: dict[str, ModelConfig] = {
    "llama-7b": _llama1(4096, 32, 32),
    "llama-13b": _llama1(5120, 40, 40),
    "llama-33b": _llama1(6656, 60, 52),
    "llama-65b": _llama1(8192, 80, 64),
    "llama2-7b": _llama2(4096, 32, 32),
    "llama2-13b": _llama2(5120, 40, 40),
    "llama2-70b": _llama2(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3-8b": _llama3(4096, 32, 32),
    "llama3-70b": _llama3(8192, 80, 64, multiple_of=4096),
    "llama3.1-8b": _llama31(4096, 32, 32),
    "llama3.1-70b": _llama31(8192, 80, 64, multiple_of=4096),
    "llama3.1-405b": _llama31(16384, 126, 128, multiple_of=4096, ffn_dim_multiplier=1.2),
    "llama3.2-1b": _llama31(2048, 16, 32, factor=32.0, multiple_of=256, ffn_dim_multiplier=1.5,
                            tie_word_embeddings=True),
    "llama3.2-3b": _llama31(3072, 28, 24, factor=32.0, multiple_of=256, ffn_dim_multiplier=1.0,
                            tie_word_embeddings=True),
    "stories260k": _tinyllama(64, 5, 8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
    "stories15m": _tinyllama(288, 6, 6, max_seq_len=256),
    "stories42m": _tinyllama(512, 8, 8),
    "stories110m": _tinyllama(768, 12, 12),
}


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def resolve_dtype(dtype):
    """A torch.dtype from a supported dtype or a name like "bf16", or None (kept as None); others are refused,
    not silently computed in another precision (the model normalises and returns logits in fp32)."""
    import torch

    if dtype is None:
        return None
    try:
        return getattr(torch, DTYPES[str(dtype).lower().removeprefix("torch.")])
    except KeyError:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)} (or torch.float32, "
                          "torch.bfloat16, torch.float16)") from None


def describe(config: ModelConfig) -> dict[str, int | float | bool | str | dict | None]:
    """Facts about a config as JSON values: shape, parameter count, bytes for weights and KV cache."""
    n = config.num_params()
    facts = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
             "n_kv_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_dim": config.ffn_hidden_dim,
             "vocab_size": config.vocab_size, "max_seq_len": config.max_seq_len, "norm_eps": config.norm_eps,
             "rope_theta": config.rope_theta,
             "rope_scaling": dataclasses.asdict(config.rope_scaling) if config.use_scaled_rope else None,
             "tied_embeddings": config.tie_word_embeddings, "chat_format": config.chat_format, "parameters": n}
    for name, size in (("fp32", 4), ("bf16/fp16", 2)):
        facts[f"weights_{name}"] = n * size
        facts[f"kv_cache_per_token_{name}"] = config.kv_cache_bytes_per_token(size)
    facts["kv_cache_full_context_bf16"] = config.kv_cache_bytes_per_token(2) * config.max_seq_len
    return facts


def format_fact(name: str, value) -> str:
    """One of describe()'s facts as `llamakit info` shows it to a person (sizes with units and commas)."""
    if name == "rope_scaling":
        return "none" if value is None else (f"llama3 (factor {value['factor']}, original context "
                                             f"{value['original_max_seq_len']})")
    if name == "chat_format":
        return value or "follows the tokenizer"
    if name == "parameters":
        return f"{value:,}"
    return _bytes(value) if name.startswith(("weights_", "kv_cache_")) else str(value)


def _bytes(n: int) -> str:
    """1536 -> '1.50 KiB (1,536 B)'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n:,} B" if unit == "B" else f"{value:,.2f} {unit} ({n:,} B)"
