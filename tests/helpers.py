"""Tiny random Llama models built with transformers: the independent reference for parity tests."""

from __future__ import annotations

import socket

import torch

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)


def hf_llama(seed: int = 0, **overrides):
    """A transformers LlamaForCausalLM with O(1) random weights (so logit errors are not hidden by tiny values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm gains around 1
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def random_tokens(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def kill_when_exists(command: list[str], marker, env: dict, timeout: float = 120) -> None:
    """Run command and SIGKILL it as soon as the path `marker` appears (it must still be running then)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


CLEAR_CHOICE = ("Once upon a time, there was a girl.", "zq xv kk pp qz vv.")  # (chosen, rejected): easy to learn


def write_clear_preferences(path, count: int = 72):
    """A JSONL of `count` pairs that always prefer a story to gibberish: a preference any model learns quickly."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"Tell me story number {i}.", "chosen": CLEAR_CHOICE[0],
                                "rejected": CLEAR_CHOICE[1]}) + "\n")
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (for a server or torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
