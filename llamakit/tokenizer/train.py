"""Train a SentencePiece BPE tokenizer the way LLaMA's was trained.

LLaMA (Touvron et al., 2023, section 2.1): BPE from SentencePiece, numbers split into single digits,
unknown UTF-8 characters falling back to bytes. We also keep the text exactly as given (identity
normalization, no whitespace squeezing) so that decode(encode(text)) == text, and use Llama's ids
unk=0, bos=1, eos=2.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece

from llamakit.errors import TokenizerError
from llamakit.files import write_atomic

logger = logging.getLogger(__name__)

N_BYTE_PIECES = 256  # byte fallback needs one piece per byte value
N_META_PIECES = 3  # <unk>, <s>, </s>
# sentencepiece's messages about vocabularies it cannot build; we rephrase them with the fix.
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(texts: Iterable[str], output: str | os.PathLike[str], vocab_size: int, *,
                    special_tokens: Iterable[str] = (), character_coverage: float = 0.99995,
                    max_sentence_length: int = 16384, input_sentence_size: int = 5_000_000,
                    num_threads: int | None = None, overwrite: bool = False) -> Path:
    """Train a LLaMA-style BPE SentencePiece model on texts and write it atomically to output (a .model file)."""
    output, special_tokens = Path(output), list(dict.fromkeys(special_tokens))
    _check_request(output, vocab_size, special_tokens, overwrite)
    lines = _LineFeed(texts, max_sentence_length)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=special_tokens, character_coverage=character_coverage,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if logger.isEnabledFor(logging.DEBUG) else 2)
    except RuntimeError as err:
        raise lines.error or _rephrase(err, vocab_size, lines.count) from None
    if lines.skipped:
        logger.warning("skipped %d lines longer than %d bytes (raise max_sentence_length to keep them)",
                       lines.skipped, max_sentence_length)
    _write_atomic(output, model.getvalue())
    logger.info("trained a %d-token BPE tokenizer on %d lines: %s", vocab_size, lines.count, output)
    return output


def sentence_iterator(texts: Iterable[str]) -> Iterator[str]:
    """The non-blank lines of each text: SentencePiece's trainer learns from lines, not documents."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def min_vocab_size(special_tokens: Iterable[str] = ()) -> int:
    """The smallest vocabulary with byte fallback: bytes, unk/bos/eos, the special tokens and one merge."""
    return N_BYTE_PIECES + N_META_PIECES + len(list(special_tokens)) + 1


class _LineFeed:
    """The lines fed to the trainer: counts them, skips over-long ones, and keeps a reader's error.

    The trainer turns any exception raised by its iterator into a RuntimeError, which would hide
    e.g. a DataError from the reader, so the original is kept here and raised instead.
    """

    def __init__(self, texts: Iterable[str], max_bytes: int):
        self.texts, self.max_bytes = texts, max_bytes
        self.count = self.skipped = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for line in sentence_iterator(self.texts):
                if len(line.encode("utf-8", "replace")) > self.max_bytes:
                    self.skipped += 1
                    continue
                self.count += 1
                yield line
        except Exception as err:
            self.error = err
            raise


def _check_request(output: Path, vocab_size: int, special_tokens: list[str], overwrite: bool) -> None:
    """Raise TokenizerError for a vocabulary too small for byte fallback, bad tokens, or a bad output path."""
    smallest = min_vocab_size(special_tokens)
    if vocab_size < smallest:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte fallback needs {N_BYTE_PIECES} byte pieces "
                             f"+ {N_META_PIECES} for <unk>/<s>/</s> + {len(special_tokens)} special tokens; "
                             f"use at least {smallest} (LLaMA used 32000)")
    for token in special_tokens:
        if not token or token != token.strip():
            raise TokenizerError(f"special token {token!r} is empty or has surrounding whitespace; give its plain name, "
                                 "e.g. <|endoftext|>")
    if output.is_dir():
        raise TokenizerError(f"{output} is a folder; pass a file name for the tokenizer, e.g. {output}/tokenizer.model")
    if output.exists() and not overwrite:
        raise TokenizerError(f"{output} already exists; choose another output file or allow overwriting it")


def _rephrase(err: RuntimeError, vocab_size: int, n_lines: int) -> TokenizerError:
    """A TokenizerError saying why sentencepiece refused to train, and what to change."""
    message = str(err)
    if n_lines == 0:
        return TokenizerError("the training text is empty (no non-blank lines); pass files that contain text")
    if match := _TOO_HIGH.search(message):
        return TokenizerError(f"vocab_size {vocab_size} is more than this corpus supports (at most {match[2]} tokens "
                              f"from {n_lines} lines); lower the vocabulary size or train on more text")
    if match := _TOO_SMALL.search(message):
        return TokenizerError(f"vocab_size {vocab_size} is too small for this corpus: its characters, the byte pieces "
                              f"and the special tokens alone take {match[2]} ids; use a vocab size well above "
                              f"{match[2]}, or lower character_coverage so that rare characters fall back to bytes")
    return TokenizerError(f"sentencepiece could not train a tokenizer: {message.splitlines()[0]}")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write data to path through a temporary sibling, so that path is never half-written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as err:
        raise TokenizerError(f"cannot write the tokenizer to {path} ({err.strerror}); choose a writable location") \
            from None
