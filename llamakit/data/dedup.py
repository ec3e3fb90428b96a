"""Document deduplication: exact (hash of the normalised text) and near (MinHash LSH, Broder 1997).

Both keep the first occurrence in corpus order, so the result does not depend on worker count.
Near-duplicates are found with datasketch's MinHash LSH over word or character n-gram shingles;
each LSH candidate is then confirmed with the MinHash estimate of the Jaccard similarity, so only
pairs estimated at or above the threshold are dropped. MinHash uses a fixed seed (deterministic).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

_SPACE_RUN = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
UNITS = ("word", "char")
_UPDATE_BATCH = 1024  # shingles hashed at once: 1 MB of scratch at 128 permutations, whatever the document


@dataclass
class DedupConfig:
    """Which duplicates to remove, and how near counts as a duplicate."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of shingle sets at or above which a document is a near-duplicate
    ngram: int = 5  # shingle length, in words or characters
    unit: str = "word"  # "word": n-grams of words (punctuation ignored); "char": n-grams of characters
    num_perm: int = 128  # MinHash permutations: more is more exact and slower
    seed: int = 1


@dataclass
class Removed:
    """Documents (and their characters) removed by one stage."""

    documents: int = 0
    chars: int = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.chars += len(text)


def exact_key(text: str) -> bytes:
    """A digest equal for texts that differ only in case and whitespace."""
    normal = _SPACE_RUN.sub(" ", text.casefold()).strip()
    return hashlib.blake2b(normal.encode("utf-8", "replace"), digest_size=16).digest()


def remove_exact_duplicates(docs: Iterable[str]) -> tuple[list[str], Removed]:
    """docs without repeats of an earlier document's exact_key."""
    seen: set[bytes] = set()
    kept, removed = [], Removed()
    for doc in docs:
        key = exact_key(doc)
        if key in seen:
            removed.add(doc)
        else:
            seen.add(key)
            kept.append(doc)
    return kept, removed


def shingles(text: str, n: int = 5, unit: str = "word") -> set[str]:
    """The set of n-grams that near-dedup compares: lower-case words (or characters, whitespace squeezed)."""
    if unit not in UNITS:
        raise ValueError(f"unknown shingle unit {unit!r}; use one of {', '.join(UNITS)}")
    if unit == "word":
        words = _WORD.findall(text.lower())
        return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()
    chars = _SPACE_RUN.sub(" ", text.lower()).strip()
    return {chars[i:i + n] for i in range(max(1, len(chars) - n + 1))} if chars else set()


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def signature(text: str, config: DedupConfig):
    """The MinHash signature (a datasketch LeanMinHash, small to pickle) of text's shingles."""
    from datasketch import LeanMinHash, MinHash

    minhash = MinHash(num_perm=config.num_perm, seed=config.seed)
    grams = [s.encode("utf-8", "replace") for s in shingles(text, config.ngram, config.unit)]
    for start in range(0, len(grams), _UPDATE_BATCH):  # update_batch holds a (batch, num_perm) uint64 array
        minhash.update_batch(grams[start:start + _UPDATE_BATCH])
    return LeanMinHash(minhash)


def remove_near_duplicates(docs: list[str], config: DedupConfig,
                           map_fn: Callable[..., Iterator] = map) -> tuple[list[str], Removed]:
    """docs without those whose estimated Jaccard similarity to an earlier kept document is >= threshold.

    map_fn computes the signatures (e.g. a process pool's imap); it must preserve order.
    """
    from datasketch import MinHashLSH

    if not 0 < config.threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {config.threshold}")
    index = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    kept_signatures = {}  # position -> signature of each kept document
    kept, removed = [], Removed()
    for position, (doc, sig) in enumerate(zip(docs, map_fn(partial(signature, config=config), docs))):
        # LSH candidates may fall short of the threshold; confirm each with the MinHash estimate.
        if any(kept_signatures[key].jaccard(sig) >= config.threshold for key in index.query(sig)):
            removed.add(doc)
        else:
            index.insert(position, sig)
            kept_signatures[position] = sig
            kept.append(doc)
    return kept, removed
