"""fp32 linear layers for inference on CPU through the kernels that are fastest on this machine.

A decode step multiplies one row per sequence by every weight matrix, so its speed is how fast the kernel
streams the weights from memory. On the AMD EPYC machines we measure (2 threads), torch's MKL reads 17-21 GB/s
in such products, weights row- or column-major, while the OpenBLAS that numpy bundles reads 40-57 GB/s, what a
plain sum() reaches; and for 2 to 512 rows oneDNN (`torch.ops.mkldnn._linear_pointwise`, which inductor uses)
is 1.5-2x faster than MKL. Both cost ~4-10 us a call more than MKL, so weights under SMALL_BYTES stay with
F.linear. On Intel machines MKL with column-major weights was the fast one. So `use_rowwise()` times OpenBLAS
against MKL once per process, on a matrix larger than the caches, and `prepare_for_decoding` acts on the
answer: either every fp32 CPU linear layer and a tied head become `CpuLinear`/`CpuTiedHead` (same weights,
same state dict, row-major), which send one row to OpenBLAS and more rows to oneDNN outside autograd, or the
weights turn column-major for MKL. LLAMAKIT_CPU_LINEAR=rowwise|mkl skips the timing.

Two thread pools on two cores fight: torch's OpenMP workers spin after each parallel region while OpenBLAS's
want the same cores (a 110M model decoded 5x slower). So a forward of one token runs torch on one thread and
OpenBLAS on torch's thread count (`blas_threads`, from hooks on the model and around the compiled step), then
torch gets its threads back. Under torch.compile the product is the custom op llamakit::cpu_linear, opaque
to inductor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llamakit.errors import ConfigError
from llamakit.model.llama import TiedHead, Transformer

log = logging.getLogger(__name__)

ENV = "LLAMAKIT_CPU_LINEAR"
SMALL_BYTES = 1 << 18  # weights below this stay with F.linear: OpenBLAS and oneDNN cost ~4-10 us more a call
PROBE_SHAPE = (4096, 4096)  # 64 MiB of fp32: beyond the last-level cache, as a model's weights are


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T: one row through numpy's OpenBLAS, more through oneDNN; (..., out), fp32."""
    rows = x.detach().reshape(-1, x.size(-1))  # (M, in)
    if rows.size(0) == 1:
        y = torch.from_numpy(np.matmul(rows.numpy(), weight.detach().numpy().T))  # (1, out)
    else:
        y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight.detach(), None, "none", [], "")  # (M, out)
    return y.view(*x.shape[:-1], weight.size(0))


@torch.library.custom_op("llamakit::cpu_linear", mutates_args=())
def _product_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """_product as an op torch.compile leaves alone (eager code calls _product itself: cheaper)."""
    return _product(x, weight)


@_product_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear (bias-free) for a row-major fp32 CPU weight through `_product`, or F.linear for a small weight and
    where autograd must see it."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.numel() * 4 < SMALL_BYTES
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return torch.ops.llamakit.cpu_linear(x, weight)
    return _product(x, weight)


class CpuLinear(nn.Linear):
    """nn.Linear (bias-free, fp32, on CPU) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class CpuTiedHead(TiedHead):
    """TiedHead (fp32, on CPU) computed by `linear`."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.weight)


@functools.cache
def _openblas_pools() -> tuple:
    """threadpoolctl's handles on the OpenBLAS libraries loaded (numpy's; scipy's if imported first)."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(internal_api="openblas").lib_controllers)


@contextlib.contextmanager
def blas_threads() -> Iterator[None]:
    """torch on one thread and OpenBLAS on torch's thread count, for the duration."""
    threads = torch.get_num_threads()
    for pool in _openblas_pools():
        if pool.num_threads != threads:
            pool.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def use_rowwise() -> bool:
    """Whether OpenBLAS multiplies a row by a large fp32 matrix faster than MKL does with the matrix column-major
    (its best layout), timed once per process (about 0.1 s, the first time a model is prepared for decoding),
    unless LLAMAKIT_CPU_LINEAR says which."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice in ("rowwise", "mkl"):
        return choice == "rowwise"
    if choice:
        raise ConfigError(f"{ENV}={choice!r} is not a CPU kernel choice; use rowwise (OpenBLAS and oneDNN), mkl, "
                          "or leave it unset to time both")
    if not (_openblas_pools() and torch.backends.mkldnn.is_available()):
        return False
    weight = torch.full(PROBE_SHAPE, 0.5)  # (out, in), row-major: OpenBLAS's layout
    column_major = weight.t().contiguous().t()  # MKL's
    x = torch.full((1, PROBE_SHAPE[1]), 0.25)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def blas() -> float:
        with blas_threads():
            return seconds(lambda: _product(x, weight))

    # Alternating, best of 9 each: another process busy for a moment slows both or neither.
    times = [(blas(), seconds(lambda: F.linear(x, column_major))) for _ in range(9)]
    best_blas, best_mkl = min(t[0] for t in times), min(t[1] for t in times)
    gb = weight.numel() * 4 / 1e9
    log.info("CPU matrix-vector product: OpenBLAS %.1f GB/s, MKL %.1f GB/s; inference uses %s", gb / best_blas,
             gb / best_mkl, "OpenBLAS and oneDNN" if best_blas < best_mkl else "MKL")
    return best_blas < best_mkl


_HOOKED: weakref.WeakKeyDictionary[Transformer, _ThreadHooks] = weakref.WeakKeyDictionary()


class _ThreadHooks:
    """Forward hooks that run a one-token forward under blas_threads (outside torch.compile, whose caller does
    it: see `decode_threads`)."""

    def __init__(self):
        self._open: list[contextlib.AbstractContextManager] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # first, so that dynamo traces nothing else
            return
        tokens = args[0] if args else kwargs["tokens"]
        one = tokens.numel() == 1 and tokens.device.type == "cpu"
        self._open.append(blas_threads() if one else contextlib.nullcontext())
        self._open[-1].__enter__()

    def exit(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not torch.compiler.is_compiling() and self._open:
            self._open.pop().__exit__(None, None, None)


def decode_threads(model: Transformer, rows: int) -> contextlib.AbstractContextManager:
    """blas_threads if `model` runs one row (`rows`) through OpenBLAS, else nothing: for callers that run the
    forward compiled, where the hooks do not act."""
    return blas_threads() if rows == 1 and model in _HOOKED else contextlib.nullcontext()


def route_rowwise(model: Transformer) -> Transformer:
    """Make every fp32 CPU bias-free nn.Linear a CpuLinear and a tied head a CpuTiedHead, weights row-major, and
    install the thread hooks; idempotent."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not (isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor  # not a DTensor's shard
                and w.dtype == torch.float32 and w.device.type == "cpu"):
            continue
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = CpuLinear
        elif type(module) is TiedHead:
            module.__class__ = CpuTiedHead
        else:
            continue
        if not w.is_contiguous():
            owner = module._embedding[0] if isinstance(module, TiedHead) else module
            owner.weight = nn.Parameter(w.contiguous(), requires_grad=w.requires_grad)
    if model not in _HOOKED:
        hooks = _HOOKED[model] = _ThreadHooks()
        model.register_forward_pre_hook(hooks.enter, with_kwargs=True)
        model.register_forward_hook(hooks.exit, with_kwargs=True, always_call=True)
    return model
