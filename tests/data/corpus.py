"""Generated documents for the data tests."""

import json
import random

WORDS = ["time", "people", "way", "year", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye",
         "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem",
         "fact", "river", "garden", "window", "morning", "letter", "music", "story", "answer", "small", "large",
         "early", "young", "important", "public", "bad", "same", "able", "long", "great", "little", "own", "other",
         "old", "right", "big", "high", "different", "local", "sure", "open", "clear", "happy", "strong", "free",
         "full", "ready", "simple", "left", "hard"]


def prose(n_words: int, seed: int) -> str:
    """A random, English-looking paragraph of n_words words (random words share few 5-grams)."""
    rng = random.Random(seed)
    sentences, words = [], []
    for i in range(n_words):
        words.append(rng.choice(WORDS))
        if len(words) >= rng.randint(6, 14) or i == n_words - 1:
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
    return " ".join(sentences)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path
