"""Where a model runs: the device a user names, checked against this machine, the dtype that suits it, and the
processes of a torchrun job with their DeviceMesh.

A neutral module that every layer (training, generation, eval) may import: it imports only torch and
llamakit.errors.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llamakit.errors import LlamakitError

DEVICES = "cpu, cuda, cuda:N or mps"


def default_device() -> torch.device:
    """This process's GPU when there is one (one per torchrun rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (fp16 on older ones), as Meta's reference; fp32 on CPU, where it is fastest."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(name: str | torch.device | None, option: str = "device") -> torch.device:
    """The device `name` names, checked to exist on this machine; None or "auto" is default_device().

    `option` is how the caller's user spells the setting (e.g. "--device"), so the error names it.
    """
    if name is None or str(name) == "auto":
        return default_device()
    here = f"available here: {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LlamakitError(f"{option} {name!r} is not a device name; use {DEVICES} ({here})") from None
    problem = _unavailable(device)
    if problem:
        raise LlamakitError(f"{option} {name!r}: {problem}; {here}")
    return device


def available_devices() -> list[str]:
    """The device names that work on this machine."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def _unavailable(device: torch.device) -> str | None:
    """Why a model cannot run on device here, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible" if torch.backends.cuda.is_built() else "this PyTorch has no CUDA support"
        count = torch.cuda.device_count()
        return f"this machine has {count} CUDA device(s)" if (device.index or 0) >= count else None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS (Apple GPUs) is not available on this machine"
    if device.type == "meta":
        return "the meta device holds shapes but no values, so nothing can run on it"
    return f"llamakit does not run on {device.type} devices"


@dataclass(frozen=True)
class Processes:
    """This process's place in the job (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_processes(device: str | torch.device | None = "auto", option: str = "device") -> Processes:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU) and pick this process's device.

    A group started here is closed at exit, once every process has reached it, unless close_processes() came first.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, option)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(_backend(dev))
        atexit.register(_leave_together)
    return Processes(rank, world_size, local_rank, dev)


def device_mesh(procs: Processes) -> DeviceMesh:
    """The job's processes as a 1-D data-parallel mesh, dimension "dp" (a tensor-parallel one comes later).

    A single process outside torchrun gets a one-process group of its own, so the mesh works everywhere.
    """
    if not dist.is_initialized():
        dist.init_process_group(_backend(procs.device), store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(procs.device.type, (procs.world_size,), mesh_dim_names=("dp",))


def close_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _leave_together() -> None:
    """At exit, wait for every process before closing the group: gloo aborts a process ("terminate called
    without an active exception") whose peers tore the group down first."""
    if dist.is_initialized():
        dist.barrier()
        close_processes()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
