"""Find and open a tokenizer file, choosing the backend from the file's content, never its name."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from llamakit.errors import TokenizerError
from llamakit.tokenizer.base import Tokenizer, read_tokenizer_file
from llamakit.tokenizer.spm import NotSentencePieceError, SentencePieceTokenizer
from llamakit.tokenizer.tiktoken_bpe import TiktokenTokenizer, looks_like_tiktoken_ranks

# Where a checkpoint directory keeps its tokenizer: Meta's layout, then Hugging Face's Llama 3 layout.
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model")
# llama2.c tokenizer exports are small (433 KB for Llama 2's 32000 tokens); model .bin files are not.
_MAX_EXPORT_BYTES = 16 * 2**20


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer in a file, or in a checkpoint directory holding tokenizer.model."""
    file = _resolve(Path(path))
    data = read_tokenizer_file(file)
    if looks_like_tiktoken_ranks(data):
        return TiktokenTokenizer(file)
    try:
        return SentencePieceTokenizer(file)
    except NotSentencePieceError:
        raise _diagnose(file, data) from None


def _resolve(path: Path) -> Path:
    """The tokenizer file that path names, or the one inside the directory path."""
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist; pass a tokenizer.model file "
                             "or the checkpoint directory that contains it")
    if not path.is_dir():
        return path
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return path / name
    raise TokenizerError(f"directory {path} has no tokenizer.model (nor original/tokenizer.model).{_dir_hint(path)} "
                         "Pass the SentencePiece tokenizer.model, or for Llama 3 the original/tokenizer.model of the "
                         "Hugging Face repo; a lone Hugging Face tokenizer.json (fast tokenizer) is not supported.")


def _dir_hint(path: Path) -> str:
    """What the directory holds instead of a tokenizer.model, when it is something we recognize."""
    if (path / "tokenizer.json").is_file():
        return " It has a tokenizer.json, a Hugging Face fast tokenizer, which llamakit does not read."
    for file in sorted(path.glob("*.bin")):
        if file.stat().st_size < _MAX_EXPORT_BYTES and _is_llama2c_export(read_tokenizer_file(file)):
            return (f" {file.name} is a llama2.c tokenizer export, which llamakit does not read;"
                    " pass the .model file it was exported from.")
    return ""


def _diagnose(file: Path, data: bytes) -> TokenizerError:
    """The error for a file that is neither tokenizer format, naming what it is when recognizable."""
    if not data:
        return TokenizerError(f"tokenizer file {file} is empty; re-download it")
    if _is_llama2c_export(data):
        return TokenizerError(
            f"{file} is a llama2.c tokenizer export (tokenizer.bin / tok512.bin), which only run.c reads; "
            "pass the SentencePiece .model file it was exported from (e.g. tokenizer.model or tok512.model)")
    if data.lstrip()[:1] == b"{":
        return TokenizerError(
            f"{file} is JSON (likely a Hugging Face tokenizer.json fast tokenizer), which is not supported; "
            "pass the SentencePiece tokenizer.model or Llama 3's original/tokenizer.model")
    return TokenizerError(f"{file} is neither a SentencePiece model nor a tiktoken rank file; pass the "
                          "tokenizer.model that ships with the checkpoint")


def _is_llama2c_export(data: bytes) -> bool:
    """Whether data is llama2.c's format: int32 max length, then (float32 score, int32 n, n bytes)*."""
    if len(data) < 4:
        return False
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 65536:
        return False
    pos, count = 4, 0
    while pos + 8 <= len(data):
        score, length = struct.unpack_from("<fi", data, pos)
        if not math.isfinite(score) or not 0 <= length <= max_len:
            return False
        pos, count = pos + 8 + length, count + 1
    return pos == len(data) and count > 0  # the records must tile the file exactly
