"""Generation tests run torch on one thread, like their subprocesses (OMP_NUM_THREADS=1)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny; one thread also makes in-process results match the subprocesses bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
