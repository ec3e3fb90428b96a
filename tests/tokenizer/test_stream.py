"""Streaming detokenization: the pushed pieces always add up to decode(all ids)."""

import random

import pytest

from tests.tokenizer.samples import TEXTS

STREAM_TEXTS = [*TEXTS, "😀", " 😀", "中", "中文 and 😀😀 then 👨‍👩‍👧‍👦", "   \n\n  a",
                "\ufffd", "a\ufffd", "é" * 40, "\u200d\u200d"]


def stream_pieces(tok, ids):
    """What a StreamDecoder gives for ids: one string per push, then the flush."""
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_of_encoded_text_matches_decode(name, text, tokenizers):
    tok = tokenizers[name]
    for ids in (tok.encode(text), tok.encode(text, bos=True, eos=True)):
        pieces = stream_pieces(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in piece for piece in pieces), pieces


def test_multibyte_character_waits_for_its_last_byte(tokenizers):
    tok = tokenizers["tok512"]
    ids = tok.encode("😀")  # '▁' and four byte-fallback pieces
    assert len(ids) == 5
    assert stream_pieces(tok, ids) == ["", "", "", "", "😀", ""]


def test_leading_space_is_dropped_only_at_the_start(tokenizers):
    tok = tokenizers["llama2"]
    ids = tok.encode("Hello world again")
    assert "".join(stream_pieces(tok, ids)) == "Hello world again"
    assert stream_pieces(tok, ids)[1].startswith(" ")


def test_flush_starts_a_new_sequence(name, tokenizers):
    tok = tokenizers[name]
    stream = tok.stream()
    first, second = tok.encode("first 中"), tok.encode("second")
    out = "".join(stream.push(i) for i in first[:-1]) + stream.flush()
    assert out == tok.decode(first[:-1])
    assert "".join(stream.push(i) for i in second) + stream.flush() == tok.decode(second)


def interesting_ids(name, tok, sp_reference, llama3_reference) -> list[int]:
    """Ids that make streaming hard: bytes, controls, unk, bare spaces, partial UTF-8 tokens."""
    if name == "llama3":
        partial = [i for i in range(llama3_reference.n_vocab - 256)
                   if not _is_utf8(llama3_reference.decode_single_token_bytes(i))]
        return partial + sorted(tok.special_tokens.values())[:16] + tok.encode(" \n  \t") + tok.encode("😀中é")
    sp = sp_reference[name]
    tricky = [i for i in range(sp.get_piece_size())
              if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or set(sp.id_to_piece(i)) == {"▁"}]
    return tricky + tok.encode("😀中é a")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_stream_of_random_ids_matches_decode(name, tokenizers, sp_reference, llama3_reference):
    tok = tokenizers[name]
    tricky = interesting_ids(name, tok, sp_reference, llama3_reference)
    rng = random.Random(1234)
    for _ in range(400):
        ids = [rng.choice(tricky) if rng.random() < 0.7 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 30))]
        assert "".join(stream_pieces(tok, ids)) == tok.decode(ids), ids
