"""Where a model runs: the device a user names, checked against this machine, the dtype that suits it, and the
processes of a torchrun job with their DeviceMesh.

A neutral module that every layer (training, generation, eval) may import: it imports only torch and
llamakit.errors.
"""

from __future__ import annotations

import atexit
import dataclasses
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
    """This process's place in the job (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), and the job's layout.

    The ranks form a (pp, dp, tp) grid, tp fastest: `tp` consecutive ranks split every layer of one model
    replica (tensor parallelism, which wants the fastest links), `pp` pipeline stages each hold a slice of the
    layers, and the dp = world_size / (tp * pp) replicas each read their own share of the data.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int = 1
    pp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def with_layout(self, tp: int = 1, pp: int = 1, names: tuple[str, str] = ("tp", "pp")) -> Processes:
        """The same process in a job whose ranks split each model tp ways and its layers into pp stages;
        `names` are how the user spells the two settings, for the error."""
        for name, value in zip(names, (tp, pp)):
            if not isinstance(value, int) or value < 1:
                raise LlamakitError(f"{name}={value!r} must be a positive whole number")
        if self.world_size % (tp * pp):
            raise LlamakitError(f"{names[0]}={tp} x {names[1]}={pp} does not divide the {self.world_size} processes "
                                f"of this job; start torchrun with a multiple of {tp * pp} processes "
                                f"(--nproc_per_node), or change {names[0]}/{names[1]}")
        return dataclasses.replace(self, tp=tp, pp=pp)


def job_size() -> int:
    """How many processes the torchrun job has (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_processes(device: str | torch.device | None = "auto", option: str = "device") -> Processes:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU) and pick this process's device.

    A group started here is closed at exit, once every process has reached it, unless close_processes() came first.
    """
    world_size = job_size()
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
    """The job's processes as a (pp, dp, tp) DeviceMesh (dimensions of size 1 included, so callers index by name:
    mesh["dp"], mesh["tp"]); made once per layout, as every rank must create its groups together.

    A single process outside torchrun gets a one-process group of its own, so the mesh works everywhere.
    """
    if not dist.is_initialized():
        dist.init_process_group(_backend(procs.device), store=dist.HashStore(), rank=0, world_size=1)
    key = (procs.device.type, procs.pp, procs.dp, procs.tp)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(procs.device.type, key[1:], mesh_dim_names=("pp", "dp", "tp"))
    return _MESHES[key]


_MESHES: dict[tuple, DeviceMesh] = {}  # the meshes of the current process group, forgotten when it closes


def close_processes() -> None:
    _MESHES.clear()
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
