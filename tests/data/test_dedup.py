"""Dedup: exact (normalised hash) and near (MinHash LSH at a Jaccard threshold), first occurrence kept."""

import random

import pytest

from llamakit.data.dedup import DedupConfig, jaccard, remove_exact_duplicates, remove_near_duplicates, shingles
from tests.data.corpus import prose


def test_exact_duplicates_ignore_case_and_whitespace():
    docs = ["Hello  world.\nBye", "other", "hello world. bye", "other", "Hello world! Bye"]
    kept, removed = remove_exact_duplicates(docs)
    assert kept == ["Hello  world.\nBye", "other", "Hello world! Bye"]
    assert (removed.documents, removed.chars) == (2, len("hello world. bye") + len("other"))


def _edit(text: str, every: int, seed: int = 0) -> str:
    """text with every `every`-th word replaced by a new word."""
    words = text.split()
    rng = random.Random(seed)
    return " ".join(f"new{rng.randint(0, 10**6)}" if i % every == every // 2 else w for i, w in enumerate(words))


def test_near_duplicates_around_the_threshold():
    base = prose(200, 1)
    one_word = _edit(base, 1000)  # one word changed in 200
    many_words = _edit(base, 10)  # every 10th word changed
    other = prose(200, 2)
    near, far = jaccard(shingles(base), shingles(one_word)), jaccard(shingles(base), shingles(many_words))
    assert near > 0.9 and far < 0.6  # the true Jaccard similarities, clearly on each side of 0.8
    kept, removed = remove_near_duplicates([base, one_word, many_words, other], DedupConfig(threshold=0.8))
    assert kept == [base, many_words, other] and (removed.documents, removed.chars) == (1, len(one_word))


def test_first_occurrence_kept_and_deterministic():
    base = prose(200, 3)
    docs = [_edit(base, 1000, seed=1), base, prose(150, 4), _edit(base, 1000, seed=2)]
    first = remove_near_duplicates(docs, DedupConfig())
    assert first[0] == [docs[0], docs[2]]
    assert remove_near_duplicates(docs, DedupConfig()) == first


def test_char_shingles_and_threshold():
    assert shingles("Ab  cd", 3, "char") == {"ab ", "b c", " cd"}
    assert shingles("one, two; three", 2) == {"one two", "two three"}
    assert shingles("short", 5) == {"short"} and shingles("", 5) == set()
    base = prose(100, 5)
    variant = _edit(base, 10)  # every 10th word changed
    assert 0.65 < jaccard(shingles(base, 5, "char"), shingles(variant, 5, "char")) < 0.75
    assert len(remove_near_duplicates([base, variant], DedupConfig(unit="char", threshold=0.5))[0]) == 1
    assert len(remove_near_duplicates([base, variant], DedupConfig(unit="char", threshold=0.9))[0]) == 2


def test_bad_settings():
    with pytest.raises(ValueError, match="threshold"):
        remove_near_duplicates(["a"], DedupConfig(threshold=0))
    with pytest.raises(ValueError, match="unit"):
        shingles("a", 2, "token")
