"""Weight-only quantization, applied from outside the model: every projection and the output head become
Int8Linear or Int4Linear (int4 keeps the head at int8), which hold integer weights plus scales and multiply through
torch's CPU kernels.

int8: per output channel, symmetric: W[n, :] ~ qweight[n, :] * scale[n], qweight in [-127, 127].
int4: per group of `group_size` input columns, asymmetric: W[n, k] ~ (q - 8) * scale[g, n] + zero[g, n] with
q in [0, 15] and g = k // group_size. Asymmetric because the kernel applies a zero point at no cost, and a
group's [min, max] then uses all 16 levels (symmetric int4 wastes one level and part of the range on
lopsided groups). Scales and zeros are bf16, and the weights are quantized against the rounded values, so
dequantizing the stored tensors is exactly the matrix the kernel multiplies by.

Both kernels are vectorised for bf16 activations only (fp32 and fp16 fall back to scalar loops, 20-50x
slower, measured with torch 2.13), so the layers compute in bf16 and return the input's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llamakit.errors import ConfigError, LlamakitError
from llamakit.model.llama import TiedHead, Transformer
from llamakit.model.lora import LoRALinear
from llamakit.model.transforms import Transform, apply_transforms, register

log = logging.getLogger(__name__)

KINDS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
INT8_IN_MULTIPLE = 16  # the int8 kernel reads rows in blocks of 16 (other widths: wrong results or a crash)
INT4_OUT_MULTIPLE = 16  # the int4 kernel packs output channels in blocks of 16
PACK_ROWS = 256  # int4 packing runs on this many rows at a time: a multiple of the kernel's blocks of 32 or 64
COMPUTE_DTYPE = torch.bfloat16
TINY = torch.finfo(COMPUTE_DTYPE).tiny  # smallest scale: an all-zero row or group quantizes to zeros


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (..., in) as contiguous bf16 rows (M, width), zero-padded where the stored weight is wider than in."""
    rows = x.reshape(-1, x.size(-1)).to(COMPUTE_DTYPE)  # (M, in)
    if rows.size(1) != width:
        rows = F.pad(rows, (0, width - rows.size(1)))  # (M, width): padded weight columns meet zeros
    return rows.contiguous()


def _check_cpu(x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise LlamakitError(f"quantized layers run on CPU only (torch's int8/int4 CPU kernels), not {x.device}; "
                            "load the model with device cpu, or without quantization")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> qweight (out, in rounded up to 16) int8 and scales (out,) bf16."""
    w = weight.detach().float().contiguous()  # row-major whatever the weight's strides (prepare_for_decoding)
    scales = (w.abs().amax(dim=1) / 127).clamp(min=TINY).to(COMPUTE_DTYPE)  # (out,)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)  # (out, in)
    return F.pad(q, (0, _round_up(w.size(1), INT8_IN_MULTIPLE) - w.size(1))), scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> q (n, k) uint8 in 0..15 and scales_and_zeros (k / group_size, n, 2) bf16, with out
    rounded up to n (a multiple of 16) and in to k (a multiple of group_size) by zero rows and columns."""
    out_features, in_features = weight.shape
    n, k = _round_up(out_features, INT4_OUT_MULTIPLE), _round_up(in_features, group_size)
    w = F.pad(weight.detach().float(), (0, k - in_features, 0, n - out_features)).contiguous()  # (n, k)
    groups = w.view(n, k // group_size, group_size)  # (n, G, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (n, G)
    zeros = (low + 8 * (high - low) / 15).to(COMPUTE_DTYPE)  # (n, G): the value q = 8 stands for
    # The step that makes zero + (q - 8) * step span [low, high] around the rounded zero (exactly (high - low)
    # / 15 but for bf16 rounding, which matters where a group's spread is small next to its mean).
    scales = torch.maximum((high - zeros.float()) / 7, (zeros.float() - low) / 8).clamp(min=TINY).to(COMPUTE_DTYPE)
    q = ((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15)  # (n, G, size)
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()  # (G, n, 2)
    return q.to(torch.uint8).view(n, k), scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, k) values 0..15 -> (n, k/2) uint8, q[:, 2j] in the high nibble of byte j and q[:, 2j+1] in the low:
    the portable layout int4 checkpoints store (the kernel's own layout depends on the CPU)."""
    return q[:, 0::2] << 4 | q[:, 1::2]  # (n, k/2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: (n, k/2) uint8 -> (n, k) values 0..15."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).view(packed.size(0), -1)  # (n, k)


def pack_for_kernel(q: torch.Tensor) -> torch.Tensor:
    """(n, k) values 0..15 -> (n, k/2) uint8 in the layout of this CPU's int4 kernel.

    The kernel packs blocks of rows independently, so packing PACK_ROWS rows at a time gives the same bytes
    while the int32 copy it wants stays small."""
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32), 1)
                      for rows in q.split(PACK_ROWS)])


def unpack_from_kernel(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_for_kernel: (n, k/2) uint8 in the kernel's layout -> (n, k) values 0..15."""
    k = packed.size(1) * 2
    chunks = [_kernel_nibbles(rows)[_kernel_order(rows.size(0), k)].view(rows.size(0), k)
              for rows in packed.split(PACK_ROWS)]
    return torch.cat(chunks)  # (n, k)


def _kernel_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble of packed, low then high of each byte in turn (the kernel's layout is defined on these)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten()


@functools.lru_cache(maxsize=8)
def _kernel_order(rows: int, k: int) -> torch.Tensor:
    """For each value of a (rows, k) block read row-major, the index of the nibble the kernel packs it into.

    Learned by packing the values' own positions, one base-16 digit at a time, rather than written down from
    the kernel's source: the layout differs between AVX512, AVX2 and other CPUs and may change with torch."""
    positions = torch.arange(rows * k)
    source = torch.zeros(rows * k, dtype=torch.long)  # nibble -> the position whose value it holds
    for shift in range(0, max(1, (rows * k - 1).bit_length()), 4):
        digits = ((positions >> shift) & 15).view(rows, k).to(torch.int32)  # (rows, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1)  # (rows, k/2)
        source |= _kernel_nibbles(packed).long() << shift
    order = torch.empty_like(source)
    order[source] = positions
    return order


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights per output channel, symmetric: W ~ qweight * scales[:, None]."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        width = _round_up(in_features, INT8_IN_MULTIPLE)
        self.register_buffer("qweight", torch.empty(out_features, width, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Quantize an (out, in) weight; a meta weight gives an empty layer of the right shapes to load into."""
        module = cls(weight.size(1), weight.size(0), device=weight.device)
        if not weight.is_meta:
            module.qweight, module.scales = quantize_int8(weight)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x)
        rows = _as_rows(x, self.qweight.size(1))  # (M, in padded)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)  # (M, out) bf16
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _align(state_dict, prefix, ("qweight", "scales"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _align(state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Copy tensors that do not start on a 64-byte boundary (a memory-mapped safetensors file places them at any
    offset): torch's int8 kernel reads its weights with aligned vector loads and crashes on them."""
    for name in names:
        t = state_dict.get(prefix + name)
        if t is not None and not t.is_meta and t.device.type == "cpu" and t.data_ptr() % 64:
            state_dict[prefix + name] = t.clone()


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights in groups of group_size input columns, asymmetric:
    W[n, k] ~ (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group_size.

    In memory qweight is in the layout of this CPU's kernel; in a state dict (and so in a checkpoint) it is the
    portable pack_nibbles layout, converted on save and load.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n, k = _round_up(out_features, INT4_OUT_MULTIPLE), _round_up(in_features, group_size)
        self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.empty(k // group_size, n, 2, dtype=COMPUTE_DTYPE, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int) -> Int4Linear:
        """Quantize an (out, in) weight; a meta weight gives an empty layer of the right shapes to load into."""
        module = cls(weight.size(1), weight.size(0), group_size, device=weight.device)
        if not weight.is_meta:
            q, module.scales_and_zeros = quantize_int4(weight, group_size)
            module.qweight = pack_for_kernel(q)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x)
        rows = _as_rows(x, self.qweight.size(1) * 2)  # (M, in padded)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size,
                                                       self.scales_and_zeros)  # (M, out padded) bf16
        return y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.qweight.is_meta:  # a meta model only shows shapes, which both layouts share
            destination[prefix + "qweight"] = pack_nibbles(unpack_from_kernel(self.qweight))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        stored = state_dict.get(key)
        if stored is not None and stored.shape == self.qweight.shape and not stored.is_meta:
            state_dict[key] = pack_for_kernel(unpack_nibbles(stored))  # a mismatch is left for torch to report
        _align(state_dict, prefix, ("scales_and_zeros",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _targets(model: nn.Module) -> list[str]:
    """Every nn.Linear and a tied output head, except a LoRA wrapper's own small A and B (its base is a target)."""
    lora_parts = {id(m) for w in model.modules() if isinstance(w, LoRALinear) for m in (w.lora_A, w.lora_B)}
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, TiedHead))
            and id(m) not in lora_parts]


def _swap(model: Transformer, make: Callable[[torch.Tensor], nn.Module],
          head: Callable[[torch.Tensor], nn.Module] | None = None) -> Transformer:
    """Replace each target by make(its weight) (the output head by head(its weight), if given); the original
    weights go with the replaced modules.

    A tied head gets a quantized copy of the embedding matrix, while the embedding keeps its dtype: the lookup
    reads one row per token, so a quantized table would save memory but no time, and would cost every input
    vector precision; the head reads the whole matrix every step, where fewer bytes are what make decoding fast.
    """
    targets = _targets(model)
    if not targets:
        log.warning("no linear layer left to quantize: the model is already quantized")
    for name in targets:
        parent, _, child = name.rpartition(".")
        build = head if head is not None and name == "lm_head" else make
        setattr(model.get_submodule(parent), child, build(model.get_submodule(name).weight))
    return model


def _quantized(model: Transformer, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def _convert(model: Transformer, state: dict[str, torch.Tensor], kind: type[nn.Module],
             entries: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's float weight in a checkpoint's state by its entries, one matrix at a time."""
    for name in _quantized(model, kind):
        if f"{name}.weight" in state:
            weight = state.pop(f"{name}.weight")
        elif name == "lm_head" and model.config.tie_word_embeddings:
            weight = state["embed_tokens.weight"]  # a tied checkpoint holds the head's matrix once, as the embedding
        else:
            continue  # already quantized, or missing: load_model's shape check names what is absent
        state.update({f"{name}.{key}": tensor for key, tensor in entries(weight).items()})
    return state


@register
@dataclasses.dataclass(frozen=True)
class Int8(Transform):
    """Every projection and the output head as an Int8Linear."""

    name: ClassVar[str] = "int8"

    def __call__(self, model: Transformer) -> Transformer:
        return _swap(model, Int8Linear.from_weight)

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {f"{n}.{key}": dtype for n in _quantized(model, Int8Linear)
                for key, dtype in (("qweight", torch.int8), ("scales", COMPUTE_DTYPE))}

    def convert(self, model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _convert(model, state, Int8Linear, lambda w: dict(zip(("qweight", "scales"), quantize_int8(w))))


@register
@dataclasses.dataclass(frozen=True)
class Int4(Transform):
    """Every projection as an Int4Linear with groups of group_size input columns, and the output head as an
    Int8Linear: the logits carry every error of the head straight to the sampled token (on stories260K an int4 head
    cut greedy agreement with fp32 from 72 to 37 characters and raised perplexity by 8%), which is why llama.cpp's
    Q4_0 files keep it at Q6_K or Q8_0 too."""

    name: ClassVar[str] = "int4"
    group_size: int = 32  # as llama.cpp's Q4_0; on stories260K more accurate than 64-256, at the same speed

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 group size {self.group_size!r} is not supported; choose one of "
                              f"{', '.join(map(str, GROUP_SIZES))} (smaller: more accurate, larger: smaller)")

    def __call__(self, model: Transformer) -> Transformer:
        return _swap(model, lambda weight: Int4Linear.from_weight(weight, self.group_size), head=Int8Linear.from_weight)

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {**Int8().owned(model), **{f"{n}.{key}": dtype for n in _quantized(model, Int4Linear)
                for key, dtype in (("qweight", torch.uint8), ("scales_and_zeros", COMPUTE_DTYPE))}}

    def convert(self, model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def entries(weight: torch.Tensor) -> dict[str, torch.Tensor]:
            q, scales_and_zeros = quantize_int4(weight, self.group_size)
            return {"qweight": pack_nibbles(q), "scales_and_zeros": scales_and_zeros}

        return Int8().convert(model, _convert(model, state, Int4Linear, entries))


def quantization(kind: str | None, group_size: int | None = None,
                 device: torch.device | str = "cpu") -> list[Transform]:
    """The transforms for kind None, "int8" or "int4" (group_size only for int4; default 32) on a model that
    will run on `device`; refused at once where the kernels do not run."""
    if kind not in (None, *KINDS):
        raise ConfigError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    if group_size is not None and kind != "int4":
        raise ConfigError("a group size applies to int4 only (int8 has one scale per output channel)")
    if kind is None:
        return []
    if torch.device(device).type != "cpu":
        raise ConfigError(f"{kind} quantization runs on CPU only (torch's int8/int4 CPU kernels), not on {device}; "
                          "load the model on the CPU, or without quantization")
    return [Int8()] if kind == "int8" else [Int4(group_size or Int4.group_size)]


def quantize(model: Transformer, kind: str, group_size: int | None = None) -> Transformer:
    """Quantize every projection and the output head in place ("int8" or "int4"); no float copy of their weights
    is kept. The model records it, so a checkpoint saved from it loads back quantized."""
    return apply_transforms(model, quantization(kind, group_size, model.embed_tokens.weight.device))
