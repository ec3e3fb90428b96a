"""The servers `benchmarks/serve.py` compares: random-weight checkpoints, and each server as a process that is
started on a free loopback port, waited for until /health says ready, and stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import llama_cpp

THREADS = 2  # the benchmark machine's cores; both servers get all of them
MODEL_NAME = "bench"
CONFIGS = {"15m": "stories15m", "110m": "stories110m"}  # the tinyllamas shapes
VOCAB_SIZE = 32000  # theirs, and the Llama 2 tokenizer's


def make_checkpoint(config: str, workdir: Path, tokenizer: str, seed: int = 0) -> Path:
    """A llamakit checkpoint with random fp32 weights and the real Llama 2 tokenizer (reused if present)."""
    import torch

    from llamakit import ModelConfig, Transformer, save_model

    path = workdir / f"{config}-llamakit"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset(CONFIGS[config]).replace(max_seq_len=1024))
    return save_model(model, path, "llamakit", tokenizer=tokenizer, dtype="fp32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slot_context(tokens: int) -> int:
    """Per-slot context for prompt + reply, rounded up to llama.cpp's granularity of 256 (both servers get it)."""
    return -(-tokens // 256) * 256


class Server:
    """A server process; `with` starts it and waits until it answers, leaving the block stops it."""

    name = ""

    def __init__(self, ckpt: Path, gguf: Path, slots: int, tokens_per_request: int, log: Path,
                 extra_args: list[str] = ()):
        self.slots, self.context, self.log = slots, slot_context(tokens_per_request), log
        self.extra_args = list(extra_args)  # appended to the command line: tuning experiments
        self.ckpt, self.gguf, self.port = ckpt, gguf, free_port()
        self.url, self.model_name = f"http://127.0.0.1:{self.port}", MODEL_NAME
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.command() + self.extra_args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout=300)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} while starting: "
                                   f"{self._last_log_line()} (log: {self.log})")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s (log: {self.log})")

    def __exit__(self, *exc) -> None:
        """SIGTERM, as a service manager would; a server that does not exit within 30 s is killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
            raise RuntimeError(f"{self.name} did not stop within 30 s of SIGTERM; killed it (log: {self.log})") from None
        if self.exit_code != 0:
            print(f"warning: {self.name} exited with status {self.exit_code} after SIGTERM (log: {self.log})",
                  file=sys.stderr)

    def _last_log_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "no output"


class LlamakitServer(Server):
    name = "llamakit"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llamakit", "serve", "--checkpoint", str(self.ckpt), "--port", str(self.port),
                "--dtype", "fp32", "--max-batch-size", str(self.slots), "--max-seq-len", str(self.context),
                "--served-model-name", self.model_name]


class LlamaCppServer(Server):
    name = "llama.cpp"

    def command(self) -> list[str]:
        return [str(llama_cpp.binaries()["llama-server"]), "--model", str(self.gguf), "--host", "127.0.0.1",
                "--port", str(self.port), "--threads", str(THREADS), "--threads-batch", str(THREADS),
                "--parallel", str(self.slots), "--ctx-size", str(self.slots * self.context), "--cont-batching",
                "--alias", self.model_name, "--no-webui"]


SERVERS = {s.name: s for s in (LlamakitServer, LlamaCppServer)}
