"""Generation tests run torch on one thread, like their subprocesses (OMP_NUM_THREADS=1); the models that the
speculative decoding tests share."""

import copy

import pytest
import torch

from llamakit import ModelConfig, Transformer
from llamakit.checkpoint import load_checkpoint
from llamakit.generate import cpu_linear

TINY = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16, max_seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every generation test module: the shared one-thread fixture of tests/conftest.py."""


@pytest.fixture
def cpu_kernel(monkeypatch):
    """Pick the CPU inference kernels (generate/cpu_linear.py) for one test: cpu_kernel("rowwise") or "mkl"."""
    def choose(kernel: str) -> None:
        monkeypatch.setenv(cpu_linear.ENV, kernel)
        cpu_linear.use_rowwise.cache_clear()

    yield choose
    cpu_linear.use_rowwise.cache_clear()  # the next test times the kernels (or reads the variable) again


def random_model(config, seed, scale=1.0):
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # sharper than the training init, so distributions differ between models
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(scale * torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def stories(assets):
    model, tokenizer = load_checkpoint(assets / "tinyllamas" / "stories260K.bin",
                                       assets / "tinyllamas" / "tok512.model", torch.float32, "cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def small_draft(stories):
    """A random draft: it rarely agrees with the target."""
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=stories[0].config.vocab_size, multiple_of=16,
                         max_seq_len=256)
    return random_model(config, seed=1)


@pytest.fixture(scope="module")
def noisy_draft(stories):
    """The target with noise on its weights: it agrees with the target often, not always."""
    draft = copy.deepcopy(stories[0])
    torch.manual_seed(2)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    return draft


@pytest.fixture(scope="module")
def tiny_pair():
    """A target and a draft over 8 tokens that overlap in part (TV ~0.4), so drafts are both accepted and
    rejected."""
    target = random_model(TINY, seed=3, scale=2.0)
    draft = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(p.std() * torch.randn_like(p))
    return target, draft
