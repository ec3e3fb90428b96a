"""Shared fixtures: the real files in ../shared/assets (skipped with a reason when absent)."""

import os
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
