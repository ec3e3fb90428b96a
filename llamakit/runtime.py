"""Where a model runs: the device a user names, checked against this machine, and the dtype that suits it.

A neutral module that every layer may import: it imports only torch and llamakit.errors.
"""

from __future__ import annotations

import os

import torch

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


def process_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (assumed so where that cannot be probed)."""
    if os.name == "nt":  # os.kill would end the process there, not probe it
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        pass
    return True
