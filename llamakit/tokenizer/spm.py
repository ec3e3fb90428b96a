"""SentencePiece tokenizers: Llama 1 and 2, Code Llama, and llama2.c's tinyllamas vocabularies."""

from __future__ import annotations

import logging
import os

import sentencepiece

from llamakit.errors import TokenizerError
from llamakit.tokenizer.base import Tokenizer, read_tokenizer_file

logger = logging.getLogger(__name__)


class NotSentencePieceError(TokenizerError):
    """The file does not parse as a SentencePiece model (load_tokenizer then says what it is instead)."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (a serialized ModelProto)."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self._sp = _load_processor(self.path)
        self._special = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())
                         if self._sp.is_control(i) or self._sp.is_unknown(i)}
        for what, token_id in (("begin-of-sequence", self._sp.bos_id()), ("end-of-sequence", self._sp.eos_id())):
            if token_id < 0:
                raise TokenizerError(f"SentencePiece model {self.path} defines no {what} token, so it is not a "
                                     "LLaMA tokenizer; pass the tokenizer.model that ships with the checkpoint")
        logger.info("loaded SentencePiece tokenizer %s (%d tokens)", self.path, self.vocab_size)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # LLaMA models define no pad piece (pad_id() is -1); unk is a real row of the embedding table.
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self._sp.unk_id()

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id})

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        # SentencePiece never parses "<s>" in text as a control token, so user text stays plain.
        return self._sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def _load_processor(path) -> sentencepiece.SentencePieceProcessor:
    """A SentencePieceProcessor for the model file at path."""
    data = read_tokenizer_file(path)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        # Loading from bytes (not the path) keeps file errors ours and non-ASCII paths working.
        processor.LoadFromSerializedProto(data)
    except RuntimeError:
        raise NotSentencePieceError(f"{path} is not a SentencePiece model (it does not parse as one); pass a "
                             "SentencePiece tokenizer.model, or use load_tokenizer() to detect the format") from None
    return processor
