"""Tokenizer fixtures: the real tokenizer files, our wrappers, and the backend libraries used directly."""

from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llamakit.tokenizer import load_tokenizer
from tests.tokenizer.samples import LLAMA3_PATTERN, LLAMA3_SPECIALS

FILES = {
    "llama2": "llama2/tokenizer.model",
    "llama3": "llama3/tokenizer.model",
    "tok512": "tinyllamas/tok512.model",
}


@pytest.fixture(scope="session", autouse=True)
def _tiktoken_cache(tmp_path_factory):
    """Keep tiktoken's file cache (it copies every rank file it loads) out of the system temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer_files(assets) -> dict[str, Path]:
    """Name -> path of each real tokenizer file."""
    return {name: assets / rel for name, rel in FILES.items()}


@pytest.fixture(scope="session")
def tokenizers(tokenizer_files):
    """Name -> our Tokenizer for each real file (loaded once: Llama 3 takes ~0.3 s)."""
    return {name: load_tokenizer(path) for name, path in tokenizer_files.items()}


@pytest.fixture(scope="session")
def llama3_reference(tokenizer_files) -> tiktoken.Encoding:
    """Llama 3 built straight from tiktoken: the independent reference for our TiktokenTokenizer."""
    ranks = load_tiktoken_bpe(str(tokenizer_files["llama3"]))
    specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    return tiktoken.Encoding("llama3-reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


@pytest.fixture(scope="session")
def sp_reference(tokenizer_files) -> dict[str, sentencepiece.SentencePieceProcessor]:
    """Name -> SentencePieceProcessor for each SentencePiece file."""
    return {name: sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_files[name]))
            for name in ("llama2", "tok512")}


@pytest.fixture(params=sorted(FILES))
def name(request) -> str:
    """Each real tokenizer in turn."""
    return request.param
