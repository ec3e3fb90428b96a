"""The one tokenizer interface the rest of llamakit sees, plus checks shared by every backend."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from llamakit.errors import TokenizerError
from llamakit.tokenizer.stream import StreamDecoder

# Checkpoints round their embedding table up (e.g. to a multiple of 64 or 128) for speed; a gap
# larger than this means the tokenizer belongs to a different model.
MAX_VOCAB_PADDING = 1024


class Tokenizer(abc.ABC):
    """Text <-> token ids for one tokenizer file, whatever library backs it."""

    kind: ClassVar[str]

    def __init__(self, path: str | os.PathLike[str]):
        self._path = Path(path)

    @property
    def path(self) -> Path:
        """The tokenizer file this was loaded from."""
        return self._path

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids for text; special-token names inside text are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._encode(_fix_surrogates(text)) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """The text for ids (SentencePiece drops control tokens; tiktoken spells out their names)."""
        ids = [int(i) for i in ids]  # also accepts numpy / torch integers
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise self._out_of_range(ids)
        return self._decode(ids)

    def stream(self, follows_text: bool = False) -> StreamDecoder:
        """A decoder that turns ids into text one at a time, e.g. while generating.

        With follows_text the ids continue a prompt: a SentencePiece word's leading space is kept,
        as it reads in decode(prompt + ids), where decode(ids) alone would drop it.
        """
        return StreamDecoder(self, follows_text)

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """The id that starts a sequence."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """The id that ends a sequence (what `encode(..., eos=True)` appends)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """A real, embeddable id for padding batches (never -1)."""

    @property
    @abc.abstractmethod
    def stop_ids(self) -> frozenset[int]:
        """Ids at which generation stops."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Name -> id of every special (control) token."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, special tokens included."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The backend's ids for text, without bos/eos."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """The backend's text for ids already known to be in range."""

    def _out_of_range(self, ids: list[int]) -> TokenizerError:
        """The error for ids the vocabulary does not have."""
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        return TokenizerError(
            f"cannot decode token ids {bad[:5]}: tokenizer {self.path} has ids 0..{self.vocab_size - 1}; "
            "the ids come from a model with a different vocabulary, so load the tokenizer that ships with it")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


def _fix_surrogates(text: str) -> str:
    """text with surrogate pairs joined and lone surrogates made U+FFFD, so that it is valid UTF-8."""
    # Such strings come from bad JSON escapes; SentencePiece raises an opaque error on them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def read_tokenizer_file(path: Path) -> bytes:
    """The raw bytes of a tokenizer file, or a TokenizerError that says why they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} does not exist; pass the path of a tokenizer.model file") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path} is a directory; pass the tokenizer.model file inside it, "
                             "or use load_tokenizer(), which also accepts directories") from None
    except OSError as err:
        raise TokenizerError(f"cannot read tokenizer file {path}: {err.strerror}; check that it is "
                             "readable") from None


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
    """Fail early when a model's embedding table (at `where`) cannot belong to this tokenizer."""
    size = tokenizer.vocab_size
    if size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.path} has {size} tokens but the model at {where} has only "
            f"{model_vocab_size} embeddings, so some ids would index past its table; "
            f"use the tokenizer that ships with {where}")
    if model_vocab_size - size > MAX_VOCAB_PADDING:
        raise TokenizerError(
            f"the model at {where} has {model_vocab_size} embeddings but tokenizer {tokenizer.path} has only "
            f"{size} tokens ({model_vocab_size - size} more; padding is at most {MAX_VOCAB_PADDING}), "
            f"so this is the wrong tokenizer; use the one that ships with {where}")
