"""Generation tests run torch on one thread, like their subprocesses (OMP_NUM_THREADS=1)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every generation test module: the shared one-thread fixture of tests/conftest.py."""
