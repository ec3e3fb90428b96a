"""The Llama 3 tokenizer: tiktoken byte-level BPE ranks, Meta's split pattern and 256 special tokens."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llamakit.errors import TokenizerError
from llamakit.tokenizer.base import Tokenizer, read_tokenizer_file

logger = logging.getLogger(__name__)

# Meta's Llama 3 pre-tokenizer: text is cut into these pieces before BPE merges run inside each.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_SPECIAL_TOKENS = 256
# Offsets (from the first id after the BPE ranks) of the named Llama 3.1 special tokens.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}

# tiktoken slows down on very long inputs, and on ~1M spaces its regex engine overflows its stack and
# panics (tiktoken 0.14; pyo3's PanicException is not an Exception), so text is cut into bounded slices first.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run (all whitespace or all non-whitespace) longer than MAX_RUN_CHARS, matched only at its start
# (the lookbehinds) so that scanning stays linear.
_OVERLONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))
_SPACE_AFTER_WORD = re.compile(r"(?<=\S) ")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def llama3_special_names() -> list[str]:
    """The 256 Llama 3.1 special-token names in id order; unnamed slots are numbered reserved tokens."""
    names, n_reserved = [], 0
    for offset in range(NUM_SPECIAL_TOKENS):
        if offset in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[offset])
        else:
            names.append(f"<|reserved_special_token_{n_reserved}|>")
            n_reserved += 1
    return names


def looks_like_tiktoken_ranks(data: bytes, n_lines: int = 5) -> bool:
    """Whether data starts like a tiktoken rank file: text lines '<base64 token> <rank>'."""
    head = data[:4096].splitlines()
    if len(data) > 4096:
        head = head[:-1]  # the last line of the head may be cut short
    lines = [line for line in head if line.strip()][:n_lines]
    return bool(lines) and all(_is_rank_line(line) for line in lines)


def _is_rank_line(line: bytes) -> bool:
    """Whether line reads '<base64 token> <rank>'."""
    parts = line.split()
    return (len(parts) == 2 and parts[1].isdigit() and len(parts[0]) % 4 == 0
            and _BASE64.fullmatch(parts[0]) is not None)


def split_for_bpe(text: str) -> list[str]:
    """Cut text into slices that tiktoken encodes quickly and safely; they join back to text."""
    if len(text) <= MAX_RUN_CHARS:
        return [text]
    return [chunk for part in _cut_overlong_runs(text) for chunk in _cut_chunks(part)]


def _cut_overlong_runs(text: str):
    """Yield slices of text in which no whitespace or non-whitespace run exceeds MAX_RUN_CHARS."""
    start = 0
    for run in _OVERLONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _cut_chunks(text: str):
    """Yield slices of at most MAX_CHUNK_CHARS, cut where the Llama 3 pattern splits anyway."""
    start = 0
    while len(text) - start > MAX_CHUNK_CHARS:
        cut = _chunk_boundary(text, start, start + MAX_CHUNK_CHARS)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _chunk_boundary(text: str, start: int, limit: int) -> int:
    """The last index in (start, limit] of a space that follows non-whitespace, else limit."""
    # No piece of the pattern spans such a boundary (a word may start with the space, nothing may
    # end with it), so encoding the two sides apart gives the same ids as encoding them together.
    cut = limit
    for match in _SPACE_AFTER_WORD.finditer(text, start + 1, limit + 1):
        cut = match.start()
    return cut


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.1 / 3.2 / 3.3: a tiktoken rank file (Meta's `tokenizer.model`)."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        ranks = _load_ranks(self.path)
        n_base = len(ranks)  # the special tokens' ids start right after the BPE ranks
        self._special = {name: n_base + i for i, name in enumerate(llama3_special_names())}
        self._encoding = tiktoken.Encoding(name=f"llama3:{self.path}", pat_str=LLAMA3_PATTERN,
                                           mergeable_ranks=ranks, special_tokens=self._special)
        logger.info("loaded tiktoken tokenizer %s (%d tokens)", self.path, self.vocab_size)

    @property
    def bos_id(self) -> int:
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|end_of_text|>"]

    @property
    def pad_id(self) -> int:
        return self._special["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self._special[name] for name in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def _encode(self, text: str) -> list[int]:
        # Special-token names typed by a user are plain text: they must never become control ids.
        ids: list[int] = []
        for piece in split_for_bpe(text):
            ids.extend(self._encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)  # invalid UTF-8 becomes U+FFFD


def _load_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks in a tiktoken file, checked to be the ids 0..n-1."""
    data = read_tokenizer_file(path)
    if not looks_like_tiktoken_ranks(data):
        raise TokenizerError(f"{path} is not a tiktoken rank file (lines '<base64 token> <rank>'); pass Llama 3's "
                             "tokenizer.model, or use load_tokenizer() to detect the format")
    try:
        # load_tiktoken_bpe caches files by path name alone in a temp dir; giving it the content hash
        # makes it drop a stale copy when the file at this path has been replaced.
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as err:
        raise TokenizerError(f"tiktoken rank file {path} is malformed ({err}); re-download it") from None
    if set(ranks.values()) != set(range(len(ranks))):
        raise TokenizerError(f"tiktoken rank file {path} does not number its {len(ranks)} tokens 0..{len(ranks) - 1} "
                             "(duplicate or missing ranks); re-download it")
    return ranks
