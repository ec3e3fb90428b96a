"""Shared fixtures: the real files in ../shared/assets (skipped with a reason when absent)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("LLAMAKIT_SHARED_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real tokenizer/checkpoint files; tests that need them skip when ../shared is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real assets not found at {SHARED_ASSETS} (clone with ../shared beside the repo, "
                    "or set LLAMAKIT_SHARED_ASSETS)")
    return SHARED_ASSETS


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module, like its subprocesses (OMP_NUM_THREADS=1): tiny models gain nothing from
    more, and in-process results then match the subprocesses' bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 KiB file system (tmpfs), too small for any checkpoint; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs Linux and root)")
    yield mount
    subprocess.run(["umount", "--lazy", mount], check=True)  # lazy: a file a failed writer left open is no obstacle
