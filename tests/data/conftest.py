"""Data fixtures: a small tokenizer trained on the fly."""

import pytest

from llamakit.tokenizer import load_tokenizer
from llamakit.tokenizer.train import train_tokenizer
from tests.data.corpus import prose


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A 320-token LLaMA-style tokenizer trained on generated prose (fast; no assets needed)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    return train_tokenizer([prose(300, seed) for seed in range(40)], path, 320, num_threads=1)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)
