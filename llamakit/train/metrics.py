"""What a run reports: metrics.jsonl (every step), TensorBoard, a tqdm bar, the loss curve, and MFU."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llamakit.errors import DataError
from llamakit.files import atomic_file, write_atomic
from llamakit.model import ModelConfig

log = logging.getLogger(__name__)

# Published dense bf16 tensor-core peaks (TFLOP/s) for MFU; other devices are measured (see peak_flops).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight in a matmul, plus attention scores (PaLM, appendix B)."""
    matmul_params = config.num_params() - config.vocab_size * config.dim  # the embedding lookup is no matmul
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * config.dim  # ...but the tied output projection is
    return 6 * matmul_params + 12 * config.n_layers * config.dim * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None) -> float:
    """Peak FLOP/s of one device: configured, published for known GPUs, else a measured large matmul."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return _measured_matmul_flops(device, dtype)


def _measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 6) -> float:
    """The best of a few large square matmuls: what this device's math library reaches at best."""
    a = torch.ones(n, n, device=device, dtype=dtype)  # values do not matter; randn would move the training RNG
    a @ a  # warm-up: thread pools, kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def reset_peak_memory(device: torch.device) -> None:
    """Measure this process's peak memory afresh from here (the training steps', not loading's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: resets VmHWM (the peak resident set) to the current one
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device: torch.device) -> float | None:
    """This process's peak memory since reset_peak_memory: allocated CUDA memory, or on CPU the resident set
    (Linux's VmHWM; None where the system does not report it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30  # kB
    return None


class MetricsLog:
    """Rank 0's record of a run; other processes get a silent instance."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, max_steps: int, tensorboard: bool,
                 name: str = "train"):
        self.enabled, self.path = enabled, out_dir / "metrics.jsonl"
        self.tb = self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)  # a resumed run rewrites the steps after its checkpoint
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def record(self, step: int, values: dict[str, float], show: bool = False) -> None:
        """Append one step's values to metrics.jsonl and TensorBoard; refresh the bar when `show`."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if show:
            self.bar.set_postfix({k: _short(v) for k, v in values.items() if k in SHOWN})
        if "loss" in values:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            if self.tb is not None:
                self.tb.close()


SHOWN = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (a process killed mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n != lines[-1][0]:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); the metrics file is damaged") from None
            log.warning("%s:%d: dropped a record cut short (the run was killed while writing it)", path, n)
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to a resumed checkpoint's step; none when starting fresh."""
    kept = [r for r in read_metrics(path) if r["step"] <= step] if step else []
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """Training and validation loss against step, as a PNG (written atomically)."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png
