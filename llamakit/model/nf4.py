"""NF4 with double quantization (QLoRA, Dettmers et al. 2023), through bitsandbytes: the frozen 4-bit base of QLoRA.

A weight matrix is read row-major in blocks of `blocksize` (64) values; each value is stored as a 4-bit index into
the 16 NF4 levels (quantiles of a normal distribution, scaled to [-1, 1]) and each block keeps its absmax as the
scale. Double quantization stores those scales again as 8-bit codes, in blocks of 256 around their mean, with one
fp32 scale per block of scales: 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight (QLoRA §3).

Applied from outside the model like model/quantize.py's int8/int4: the registered `nf4` transform swaps every
projection of the decoder blocks (q/k/v/o, gate/up/down) for an NF4Linear, on a loaded model (one matrix at a time)
or while loading (quantizing each stored tensor as it is read). The embeddings, norms and output head keep the
model's dtype, as in QLoRA, which quantizes the linear layers of the blocks and keeps the rest in 16 bits: the
head maps every hidden state to the logits directly and is a small part of a large model (4% of LLaMA 7B).

Layers compute in the activations' dtype (fp32 on CPU, bf16 under bf16 autocast): each forward dequantizes the
weight to that dtype and multiplies, and the backward pass dequantizes it again rather than keep it, so training
holds no full-precision copy of the base (the layer only ever holds the 4-bit codes and scales).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import ClassVar

import torch
from torch import nn

from llamakit.errors import ConfigError
from llamakit.model.llama import Transformer
from llamakit.model.transforms import Transform, applied, apply_transforms, register

log = logging.getLogger(__name__)

MIN_BITSANDBYTES = (0, 46, 1)  # the first with 4-bit quantization on the CPU (0.45 raises NotImplementedError)
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept on every device
SCALE_BLOCK = 256  # double quantization: scales quantized in blocks of 256 (bitsandbytes' only nested size)
BUFFERS = {  # NF4Linear's state entries and the dtype each keeps
    "qweight": torch.uint8, "absmax": torch.uint8, "absmax_scale": torch.float32,
    "absmax_code": torch.float32, "absmax_offset": torch.float32,
}


def require_bitsandbytes():
    """The bitsandbytes module, or a one-line error that says how to install it."""
    # bitsandbytes warns at import on CPUs where an optional faster kernel package (`kernels`) is absent; the
    # fallback it uses is the one tested here, so the warning is noise for llamakit's users.
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("NF4 quantization (QLoRA) needs bitsandbytes, which is not installed: pip install "
                          "bitsandbytes (or pip install 'llamakit[qlora]')") from None
    finally:
        quiet.setLevel(level)
    version = tuple(int(part) for part in re.findall(r"\d+", bitsandbytes.__version__)[:3])
    if version < MIN_BITSANDBYTES:
        raise ConfigError(f"NF4 quantization (QLoRA) needs bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))} "
                          f"(its CPU support), not {bitsandbytes.__version__}: pip install -U bitsandbytes")
    return bitsandbytes


class DequantizedMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in x's dtype for the forward pass and again for the backward pass, so that
    autograd keeps only the 4-bit codes (as bitsandbytes' own 4-bit matmul does for training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized(grad.dtype), None  # no gradient for the frozen weight


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer holding its (out, in) weight W as NF4 with double quantization:
    W.flatten()[i] ~ NF4[q[i]] * scale[i // blocksize], scale[j] ~ code[absmax[j]] * absmax_scale[j // 256] + offset.
    """

    def __init__(self, in_features: int, out_features: int, blocksize: int = 64,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        n = in_features * out_features
        blocks = math.ceil(n / blocksize)
        empty = {"device": device}
        self.register_buffer("qweight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **empty))  # 2 per byte
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, **empty))  # each block's scale, 8-bit
        self.register_buffer("absmax_scale", torch.empty(math.ceil(blocks / SCALE_BLOCK), **empty))
        self.register_buffer("absmax_code", torch.empty(256, **empty))  # the values of the scales' 8-bit codes
        self.register_buffer("absmax_offset", torch.empty((), **empty))  # the mean scale, subtracted before coding

    @classmethod
    def from_weight(cls, weight: torch.Tensor, blocksize: int = 64) -> NF4Linear:
        """Quantize an (out, in) weight; a meta weight gives an empty layer of the right shapes to load into.

        Quantized on the CPU from fp32 values, so that a base gives the same codes wherever and in whatever
        dtype it was loaded (bf16 and fp16 convert to fp32 exactly): an adapter meets the base it was trained on."""
        module = cls(weight.size(1), weight.size(0), blocksize, device=weight.device)
        if not weight.is_meta:
            for key, tensor in quantize_nf4(weight, blocksize).items():
                setattr(module, key, tensor.to(weight.device))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizedMatmul.apply(x, self)  # (..., out)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer multiplies by, in dtype.

        Dequantized as one flat row of out * in values, which is how the blocks run: given the (out, in) shape,
        bitsandbytes 0.50's CPU kernel misplaces the blocks of some widths that are not a multiple of the block
        size (48, 96 or 160 columns with blocks of 64; tested)."""
        F = require_bitsandbytes().functional
        scales = F.QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=SCALE_BLOCK,
                              dtype=torch.float32)
        state = F.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features * self.in_features,)),
                             blocksize=self.blocksize, quant_type="nf4", dtype=dtype, offset=self.absmax_offset,
                             state2=scales)
        return F.dequantize_4bit(self.qweight, state).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}"


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """An (out, in) weight as NF4Linear's state entries (on the CPU), quantized by bitsandbytes."""
    F = require_bitsandbytes().functional
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    qweight, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    return {"qweight": qweight, "absmax": state.absmax, "absmax_scale": state.state2.absmax,
            "absmax_code": state.state2.code, "absmax_offset": state.offset.reshape(())}


def _targets(model: Transformer) -> list[str]:
    """Every projection of the decoder blocks that is still a plain nn.Linear (not quantized, not LoRA-wrapped)."""
    return [f"layers.{i}.{part}.{child}" for i, block in enumerate(model.layers) for part in ("self_attn", "mlp")
            for child, m in block.get_submodule(part).named_children() if isinstance(m, nn.Linear)]


def _quantized(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@register
@dataclasses.dataclass(frozen=True)
class NF4(Transform):
    """Every projection of the decoder blocks as an NF4Linear: QLoRA's frozen 4-bit base."""

    name: ClassVar[str] = "nf4"
    blocksize: int = 64  # QLoRA's

    def __post_init__(self):
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"nf4 block size {self.blocksize!r} is not supported; choose one of "
                              f"{', '.join(map(str, BLOCKSIZES))} (QLoRA uses 64)")
        require_bitsandbytes()  # at once, not after the base has been read

    def __call__(self, model: Transformer) -> Transformer:
        targets = _targets(model)
        if not targets:
            log.warning("no plain projection left to quantize to NF4: the model is already quantized or LoRA-wrapped")
        for name in targets:  # one matrix at a time: the replaced fp32 weight is freed before the next is quantized
            _replace(model, name, NF4Linear.from_weight(model.get_submodule(name).weight, self.blocksize))
        return model

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {f"{n}.{key}": dtype for n in _quantized(model) for key, dtype in BUFFERS.items()}

    def convert(self, model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replace each projection's float weight in a checkpoint's state by its NF4 entries, one at a time."""
        for name in _quantized(model):
            if f"{name}.weight" in state:  # else already NF4, or missing: load_model's shape check names it
                entries = quantize_nf4(state.pop(f"{name}.weight"), self.blocksize)
                state.update({f"{name}.{key}": tensor for key, tensor in entries.items()})
        return state


def apply_nf4(model: Transformer, blocksize: int = 64) -> Transformer:
    """Quantize every projection of the decoder blocks to NF4 in place; the model records it."""
    return apply_transforms(model, [NF4(blocksize)])


def nf4_transform(model: nn.Module) -> NF4 | None:
    """The NF4 transform applied to the model, if any (what a QLoRA adapter records about its base)."""
    return next((t for t in applied(model) if isinstance(t, NF4)), None)


@torch.no_grad()
def dequantize_nf4(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear (a LoRA wrapper's base too) by an nn.Linear holding its dequantized weight, in dtype
    (default: the embeddings'), and forget the transform: a plain model again, equal to the quantized one."""
    for name in _quantized(model):
        quantized = model.get_submodule(name)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=False, device="meta")
        weight = quantized.dequantized(dtype or model.embed_tokens.weight.dtype)  # (out, in)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        _replace(model, name, linear)
    model.applied_transforms = [t for t in applied(model) if not isinstance(t, NF4)]
    return model
