"""A word n-gram language model with interpolated modified Kneser-Ney smoothing, and CCNet's perplexity buckets.

CCNet (Wenzek et al., 2019) scores each web document with an n-gram model trained on Wikipedia and sorts
documents into head / middle / tail thirds by perplexity: text that reads like the reference scores low.
KenLM trains such models with its `lmplz` binary; its pip package only queries them, so this module trains
its own, with numpy: n-grams are stored as sorted 64-bit hashes with their counts (about 25 bytes per
n-gram; 1 MB of reference text gives some 700k n-grams at order 5 and trains in a second or two), and a
document is scored with a handful of vectorised lookups per order.

Smoothing follows Chen & Goodman (1998), "interpolated modified Kneser-Ney": for order k and context h,

    p_k(w | h) = max(a_k(h w) - D_k(a_k(h w)), 0) / a_k(h .)  +  gamma_k(h) * p_{k-1}(w | h without its first word)
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3+ N3+(h .)) / a_k(h .)

where a_k is the raw count at the highest order and the continuation count (number of distinct words
seen before the n-gram) below it, N_r(h .) counts the words following h with a_k = r (3+ for r >= 3), and
p_0 is uniform over the vocabulary (every word seen, </s> and <unk>). A context never seen passes the
lower order's probability through unchanged. Discounts come from the count-of-counts n_r of a_k:
Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. Each line of a document is
a sentence, padded with order-1 `<s>` and ended by `</s>`; words are lower-cased, digits read as 0.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BUCKETS = ("head", "middle", "tail")  # CCNet: the best, middle and worst thirds by perplexity
FALLBACK_DISCOUNT = 0.75  # Kneser & Ney's absolute discount, used when count-of-counts cannot estimate D
_TOKEN = re.compile(r"\w+|[^\w\s]")
_DIGIT = re.compile(r"\d")


def words(line: str) -> list[str]:
    """The words of one line as the model sees them: lower case, digits as 0, punctuation marks apart."""
    return _TOKEN.findall(_DIGIT.sub("0", line.lower()))


def sentences(text: str) -> list[list[str]]:
    """The non-empty lines of text, each as its words."""
    return [w for w in map(words, text.split("\n")) if w]


_SEED = np.uint64(0xCBF29CE484222325)  # FNV-1a's offset basis and prime, applied to word ids instead of bytes
_PRIME = np.uint64(0x100000001B3)
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def ngram_keys(ids: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the n words ending at each of `ends` in ids (n = 0: the empty context).

    As KenLM's probing tables do, n-grams are stored by hash alone; with 64 bits a collision among a
    hundred million n-grams of one order has a probability below 1e-3, and it would merge two counts.
    """
    keys = np.full(ends.shape, _SEED, dtype=np.uint64)
    for offset in range(n - 1, -1, -1):
        keys = (keys ^ ids[ends - offset].astype(np.uint64)) * _PRIME  # wraps modulo 2**64, as intended
    return keys


@dataclass
class _Order:
    """One order k: a_k per n-gram, and per context its total and N1/N2/N3+ (by a_k), as sorted hash tables."""

    gram_keys: np.ndarray  # (G,) uint64, sorted
    gram_counts: np.ndarray  # (G,) a_k: raw counts at the highest order, continuation counts below
    context_keys: np.ndarray  # (C,) uint64, sorted
    context_stats: np.ndarray  # (C, 4): total a_k, N1, N2, N3+
    discounts: tuple[float, float, float]

    @classmethod
    def build(cls, gram_keys: np.ndarray, counts: np.ndarray, context_of: np.ndarray,
              discounts: tuple[float, float, float]) -> _Order:
        """From each distinct n-gram's key, a_k and its context's key."""
        order = np.argsort(gram_keys)
        contexts, inverse = np.unique(context_of, return_inverse=True)
        stats = np.zeros((len(contexts), 4), dtype=np.int32)
        np.add.at(stats[:, 0], inverse, counts)
        np.add.at(stats, (inverse, np.minimum(counts, 3)), 1)  # column 1, 2 or 3 by a_k
        return cls(gram_keys[order], counts[order].astype(np.int32), contexts, stats, tuple(discounts))

    def lookup(self, grams: np.ndarray, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a_k of each n-gram, the context stats row of each context: zeros when unseen)."""
        return _find(self.gram_keys, self.gram_counts, grams), _find(self.context_keys, self.context_stats, contexts)


def _find(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values at queries' positions in sorted keys; zeros for queries not in keys."""
    at = np.minimum(np.searchsorted(keys, queries), max(len(keys) - 1, 0))
    found = keys[at] == queries if len(keys) else np.zeros(queries.shape, dtype=bool)
    out = values[at] if len(keys) else np.zeros((len(queries), *values.shape[1:]), dtype=values.dtype)
    out = out.copy()
    out[~found] = 0
    return out


def kn_discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts (Chen & Goodman eq. 26), or the fallback where they cannot say."""
    counts = np.asarray(list(counts) if not isinstance(counts, np.ndarray) else counts)
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4))
    if not (n1 and n2 and n3 and n4):
        return (FALLBACK_DISCOUNT,) * 3
    y = n1 / (n1 + 2 * n2)
    discounts = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if not all(0 < d <= r for d, r in zip(discounts, (1, 2, 3))):
        return (FALLBACK_DISCOUNT,) * 3
    return discounts


class KneserNeyLM:
    """An order-N interpolated modified Kneser-Ney model over words (see the module docstring)."""

    def __init__(self, orders: list[_Order], words: dict[str, int]):
        self.orders = orders  # orders[k - 1] holds order k
        self.words = words  # word -> id (ids from 3; 0 <unk>, 1 <s>, 2 </s>)

    @property
    def order(self) -> int:
        return len(self.orders)

    @property
    def vocab(self) -> frozenset[str]:
        """The words p_0 spreads over: every word seen, </s> and <unk>."""
        return frozenset(self.words) | {EOS, UNK}

    @classmethod
    def train(cls, texts: Iterable[str], order: int = 5,
              discounts: Sequence[tuple[float, float, float]] | None = None) -> KneserNeyLM:
        """A model of texts (each line a sentence); discounts (one triple per order, lowest first) override the estimate."""
        if order < 1:
            raise ValueError(f"the n-gram order must be at least 1, got {order}")
        words: dict[str, int] = {}
        ids = _encode((s for text in texts for s in sentences(text)), order, words, grow=True)
        ends = np.flatnonzero(ids != BOS_ID)  # every predicted position has order-1 words before it
        top_keys, first, top_counts = np.unique(ngram_keys(ids, ends, order), return_index=True, return_counts=True)
        levels = [(top_keys, top_counts, ends[first])]  # (distinct keys, a_k, a position where each ends)
        for k in range(order - 1, 0, -1):  # continuation counts: distinct words before each shorter n-gram
            suffixes = ngram_keys(ids, levels[0][2], k)  # the k-gram suffix of each distinct (k+1)-gram
            keys, first, counts = np.unique(suffixes, return_index=True, return_counts=True)
            levels.insert(0, (keys, counts, levels[0][2][first]))
        chosen = discounts or [kn_discounts(counts) for _, counts, _ in levels]
        logger.debug("Kneser-Ney discounts by order: %s", chosen)
        orders = [_Order.build(keys, counts, ngram_keys(ids, where - 1, k - 1) if k > 1 else
                               np.full(keys.shape, _SEED, dtype=np.uint64), d)
                  for k, ((keys, counts, where), d) in enumerate(zip(levels, chosen), start=1)]
        return cls(orders, words)

    def _probabilities(self, ids: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """p(ids[e] | the order-1 ids before it) for each e in ends (ids padded with <s> as in training)."""
        p = np.full(ends.shape, 1.0 / (len(self.words) + 2))
        for k, level in enumerate(self.orders, start=1):
            contexts = ngram_keys(ids, ends - 1, k - 1) if k > 1 else np.full(ends.shape, _SEED, dtype=np.uint64)
            counts, stats = level.lookup(ngram_keys(ids, ends, k), contexts)
            d = np.array((0.0, *level.discounts))[np.minimum(counts, 3)]  # D(a_k), 0 for unseen n-grams
            gamma = stats[:, 1:] @ np.array(level.discounts)  # D1 N1 + D2 N2 + D3 N3+
            seen = stats[:, 0] > 0
            p = np.where(seen, (np.maximum(counts - d, 0) + gamma * p) / np.maximum(stats[:, 0], 1), p)
        return p

    def probability(self, word: str, context: Sequence[str]) -> float:
        """p(word | the last order-1 words of context; <s> before a shorter one)."""
        known = [BOS] * (self.order - 1) + list(context)[max(0, len(context) - self.order + 1):] + [word]
        ids = np.array([{BOS: BOS_ID, EOS: EOS_ID}.get(w, self.words.get(w, UNK_ID)) for w in known])
        return float(self._probabilities(ids, np.array([len(ids) - 1]))[0])

    def log_prob(self, text: str) -> tuple[float, int]:
        """(natural-log probability of text's sentences, number of predicted words including each </s>)."""
        ids = _encode(sentences(text), self.order, self.words, grow=False)
        ends = np.flatnonzero(ids != BOS_ID)
        return float(np.log(self._probabilities(ids, ends)).sum()) if len(ends) else 0.0, len(ends)

    def perplexity(self, text: str) -> float:
        """exp(-mean log p) over text's words (and sentence ends); inf for text without words."""
        log_prob, n = self.log_prob(text)
        return math.exp(-log_prob / n) if n else math.inf


def _encode(sentence_list: Iterable[list[str]], order: int, words: dict[str, int], grow: bool) -> np.ndarray:
    """The sentences as one id array, each preceded by order-1 <s> and ended by </s> (new words get ids if grow)."""
    out: list[int] = []
    for sentence in sentence_list:
        out += [BOS_ID] * max(order - 1, 1)  # one <s> at least, so sentences stay apart at order 1
        for w in sentence:
            if grow and w not in words:
                words[w] = len(words) + 3
            out.append(words.get(w, UNK_ID))
        out.append(EOS_ID)
    return np.array(out, dtype=np.int64)


@dataclass
class PerplexityModel:
    """A Kneser-Ney model and CCNet's bucket cutoffs: perplexities of held-out reference documents at 1/3 and 2/3."""

    lm: KneserNeyLM
    cutoffs: tuple[float, float]

    def bucket(self, perplexity: float) -> str:
        """head (at most the first cutoff), middle, or tail."""
        return BUCKETS[sum(perplexity > c for c in self.cutoffs)]


HELD_OUT_EVERY = 10  # every 10th reference document is held out to place the bucket cutoffs


def train_perplexity_model(reference: Sequence[str], order: int) -> PerplexityModel:
    """Train on 9 in 10 reference documents; the cutoffs are the 1/3 and 2/3 quantiles of the rest's perplexities.

    Perplexities of the training text itself would be too low (the model has seen it), so the cutoffs
    come from documents it has not seen, as CCNet's come from unseen documents.
    """
    held = [doc for i, doc in enumerate(reference) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [doc for i, doc in enumerate(reference) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    lm = KneserNeyLM.train(train, order)
    scores = sorted(s for s in map(lm.perplexity, held) if math.isfinite(s))
    if not scores:
        raise ValueError("no held-out reference document has words")
    return PerplexityModel(lm, (quantile(scores, 1 / 3), quantile(scores, 2 / 3)))


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolating linearly between neighbours (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
