"""train_tokenizer: a LLaMA-style BPE model that loads, round-trips text exactly and explains bad requests."""

import random

import pytest

from llamakit.errors import TokenizerError
from llamakit.tokenizer import load_tokenizer
from llamakit.tokenizer.train import min_vocab_size, sentence_iterator, train_tokenizer

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def generated_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Prose-like documents with plenty of numbers, so digits are common characters."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "po", "ve", "da", "the", "cat"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 99999)}."
                      for _ in range(5)) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 400-token tokenizer trained on the generated corpus."""
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return load_tokenizer(train_tokenizer(generated_corpus(), path, 400, special_tokens=SPECIALS, num_threads=1))


def test_llama_ids_and_vocab(trained):
    assert trained.vocab_size == 400 and (trained.bos_id, trained.eos_id) == (1, 2)
    pieces = [trained._sp.id_to_piece(i) for i in range(3)]
    assert pieces == ["<unk>", "<s>", "</s>"]


def test_round_trip_digits_and_byte_fallback(trained):
    text = "The cat sat 12345 times.\n  Indented  twice, then an emoji 🦙 and ü in Zürich!"
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    digits = [trained._sp.id_to_piece(i) for i in trained.encode("2024")]
    assert digits[-4:] == ["2", "0", "2", "4"]  # split_digits: one token per digit
    llama = [trained._sp.id_to_piece(i) for i in trained.encode("🦙")]
    assert sum(p.startswith("<0x") for p in llama) == 4  # the emoji was never seen: its 4 UTF-8 bytes


def test_special_tokens_are_single_pieces(trained):
    for token in SPECIALS:
        ids = trained.encode(f"end {token} start")
        assert trained._sp.piece_to_id(token) in ids and trained.decode(ids) == f"end {token} start"


def test_shakespeare(assets, tmp_path):
    text = (assets / "corpus" / "tinyshakespeare_input.txt").read_text()
    tokenizer = load_tokenizer(train_tokenizer([text], tmp_path / "shakespeare.model", 512, num_threads=1))
    sample = text[:2000]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert len(tokenizer.encode(sample)) < len(sample) / 1.5  # it learned merges


def test_sentence_iterator_skips_blank_lines():
    assert list(sentence_iterator(["a\n\n  \nb", "", "c d"])) == ["a", "b", "c d"]


@pytest.mark.parametrize("vocab_size, specials, message", [
    (200, [], "use at least 260"),
    (min_vocab_size(SPECIALS) - 1, SPECIALS, f"use at least {min_vocab_size(SPECIALS)}"),
    (262, [], "too small for this corpus"),
    (100_000, [], "more than this corpus supports"),
])
def test_bad_vocab_sizes(vocab_size, specials, message, tmp_path):
    with pytest.raises(TokenizerError, match=message):
        train_tokenizer(generated_corpus(50), tmp_path / "t.model", vocab_size, special_tokens=specials, num_threads=1)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_empty_corpus_and_existing_output(tmp_path):
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(["", "\n \n"], tmp_path / "t.model", 300)
    (tmp_path / "t.model").write_text("x")
    with pytest.raises(TokenizerError, match="already exists"):
        train_tokenizer(generated_corpus(20), tmp_path / "t.model", 300)
    with pytest.raises(TokenizerError, match="is a folder"):
        train_tokenizer(generated_corpus(20), tmp_path, 300)


def test_reader_errors_pass_through(tmp_path):
    class Unreadable(Exception):
        pass

    def texts():
        yield "some text"
        raise Unreadable("bad row")

    with pytest.raises(Unreadable, match="bad row"):
        train_tokenizer(texts(), tmp_path / "t.model", 300)
