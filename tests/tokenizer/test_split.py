"""Guarding tiktoken against huge inputs: the splitting is lossless and leaves normal text untouched."""

import re

from llamakit.tokenizer.tiktoken_bpe import MAX_CHUNK_CHARS, MAX_RUN_CHARS, split_for_bpe


def longest_run(text: str) -> int:
    """The length of the longest all-whitespace or all-non-whitespace run in text."""
    return max((len(m.group()) for m in re.finditer(r"\s+|\S+", text)), default=0)


def test_short_text_is_not_split():
    assert split_for_bpe("hello   world") == ["hello   world"]
    assert split_for_bpe("") == [""]


def test_long_runs_are_split_losslessly():
    text = "x" * 60_000 + " " * 70_000 + "word " * 1000 + "\n" * 30_000 + "😀" * 26_000
    pieces = split_for_bpe(text)
    assert "".join(pieces) == text
    assert all(longest_run(p) <= MAX_RUN_CHARS and len(p) <= MAX_CHUNK_CHARS for p in pieces)


def test_long_text_is_chunked_before_a_word(assets):
    text = (assets / "corpus" / "tinyshakespeare_input.txt").read_text()
    pieces = split_for_bpe(text)
    assert len(pieces) == -(-len(text) // MAX_CHUNK_CHARS)
    assert "".join(pieces) == text and all(len(p) <= MAX_CHUNK_CHARS for p in pieces)
    assert all(p.startswith(" ") and not p[1].isspace() for p in pieces[1:])


def test_long_text_encodes_exactly_as_unsplit(assets, tokenizers, llama3_reference):
    # Chunk boundaries sit where the pattern splits anyway, so the ids match tiktoken's on the whole text.
    text = (assets / "corpus" / "tinyshakespeare_input.txt").read_text()
    assert len(text) > 2 * MAX_CHUNK_CHARS
    assert tokenizers["llama3"].encode(text) == llama3_reference.encode_ordinary(text)


def test_huge_whitespace_run_encodes_and_round_trips(tokenizers):
    # One million spaces make tiktoken's regex engine overflow its stack unless the run is split.
    tok = tokenizers["llama3"]
    for text in (" " * 1_000_000, "a" * 300_000 + "\n" * 300_000):
        assert tok.decode(tok.encode(text)) == text
