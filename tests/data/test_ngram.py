"""The Kneser-Ney n-gram model against a hand computation and its defining properties, and the perplexity filter."""

import math
import random

import pytest

from llamakit.data.ngram import BUCKETS, KneserNeyLM, PerplexityModel, kn_discounts, quantile, train_perplexity_model

NOUNS = ["cat", "dog", "teacher", "river", "garden", "scientist", "child", "city", "book", "bird", "farmer", "ship"]
ADJECTIVES = ["old", "small", "quiet", "bright", "careful", "green", "tall", "happy", "cold", "busy"]
VERBS = ["found", "watched", "carried", "painted", "followed", "visited", "studied", "cleaned"]
PLACES = ["park", "house", "school", "market", "forest", "harbour", "village", "library"]


def sentence(rng: random.Random) -> str:
    """One sentence of a small English grammar."""
    n, a, v, p = (lambda: rng.choice(NOUNS)), (lambda: rng.choice(ADJECTIVES)), (lambda: rng.choice(VERBS)), (
        lambda: rng.choice(PLACES))
    return rng.choice([
        f"The {a()} {n()} {v()} a {n()} near the {p()}.",
        f"A {n()} was {a()} and {a()}.",
        f"In the {p()}, the {n()} {v()} the {a()} {n()}.",
        f"Every morning the {n()} {v()} the {n()} in the {p()}.",
    ])


def sentences_corpus(count: int, seed: int) -> str:
    """A document of `count` grammatical sentences, one line."""
    rng = random.Random(seed)
    return " ".join(sentence(rng) for _ in range(count))


def gibberish(text: str, seed: int) -> str:
    """text's words in random order: the same words, no grammar."""
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def test_discounts_follow_chen_goodman():
    counts = [1, 1, 1, 1, 2, 2, 3, 4, 7]  # n1=4, n2=2, n3=1, n4=1 -> Y = 4 / (4 + 4) = 0.5
    assert kn_discounts(counts) == pytest.approx((1 - 2 * 0.5 * 2 / 4, 2 - 3 * 0.5 * 1 / 2, 3 - 4 * 0.5 * 1 / 1))
    assert kn_discounts([1, 1, 2]) == (0.75, 0.75, 0.75)  # no 3s or 4s: the fallback


def test_perplexity_matches_a_hand_computation():
    # Sentences <s> a b </s> (twice) and <s> b a </s>. Bigram counts: <s>a 2, ab 2, b</s> 2, <s>b 1, ba 1, a</s> 1.
    # Unigram continuation counts: a {<s>, b} = 2, b {a, <s>} = 2, </s> {b, a} = 2; vocabulary a, b, </s>, <unk>.
    # With discounts D1 = 0.5, D2 = D3+ = 1.0 at both orders:
    #   unigram: gamma = 1.0 * 3 / 6 = 1/2, p(a) = (2 - 1) / 6 + 1/2 * 1/4 = 7/24 (b, </s> alike)
    #   p(a | <s>) = (2 - 1) / 3 + gamma(<s>) 7/24 with gamma(<s>) = (0.5 * 1 + 1.0 * 1) / 3 = 1/2 -> 23/48
    #   p(b | a) and p(</s> | b) have the same counts -> 23/48, so perplexity("a b") = 48/23.
    lm = KneserNeyLM.train(["a b", "a b", "b a"], order=2, discounts=[(0.5, 1.0, 1.0)] * 2)
    assert lm.probability("a", ["<s>"]) == pytest.approx(23 / 48)
    assert lm.probability("</s>", ["a"]) == pytest.approx((1 - 0.5) / 3 + 0.5 * 7 / 24)
    assert lm.probability("zebra", ["a"]) == pytest.approx(0.5 * 0.5 / 4)  # unknown: <unk> gets backoff mass only
    assert lm.perplexity("a b") == pytest.approx(48 / 23)
    assert lm.perplexity("") == math.inf


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one(order):
    lm = KneserNeyLM.train([sentences_corpus(20, seed) for seed in range(10)], order=order)
    for context in (["<s>"] * (order - 1), ["the", "old", "cat", "found"][-(order - 1):] if order > 1 else [],
                    ["never", "seen", "words", "here"][-(order - 1):] if order > 1 else []):
        assert sum(lm.probability(w, context) for w in lm.vocab) == pytest.approx(1.0, abs=1e-9)


def test_grammatical_text_scores_lower_than_shuffled_words():
    lm = KneserNeyLM.train([sentences_corpus(30, seed) for seed in range(40)], order=5)
    held_out = [sentences_corpus(10, seed) for seed in range(100, 110)]
    for seed, text in enumerate(held_out):
        assert lm.perplexity(text) * 2 < lm.perplexity(gibberish(text, seed))


def test_buckets_come_from_held_out_reference_documents():
    reference = [sentences_corpus(8, seed) for seed in range(50)]
    model = train_perplexity_model(reference, order=3)
    held = sorted(model.lm.perplexity(doc) for doc in reference[9::10])  # the documents the model did not see
    assert model.cutoffs == pytest.approx((quantile(held, 1 / 3), quantile(held, 2 / 3)))
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # numpy's linear interpolation
    assert model.bucket(model.cutoffs[0]) == "head" and model.bucket(model.cutoffs[1] + 1e-9) == "tail"
    assert model.bucket(sum(model.cutoffs) / 2) == "middle" and BUCKETS == ("head", "middle", "tail")
    assert model.bucket(model.lm.perplexity(gibberish(reference[0], 0))) == "tail"
    assert isinstance(model, PerplexityModel)


def test_cli_keeps_chosen_buckets(tokenizer_file, tmp_path, capsys):
    from llamakit.cli import main
    from tests.data.corpus import write_jsonl

    write_jsonl(tmp_path / "wiki.jsonl", [sentences_corpus(8, 100 + seed) for seed in range(40)])
    good = [sentences_corpus(8, seed) for seed in range(8)]
    write_jsonl(tmp_path / "web.jsonl", good + [gibberish(good[0], 0), gibberish(good[1], 1)])
    code = main(["prepare", str(tmp_path / "web.jsonl"), "--tokenizer", str(tokenizer_file), "--output",
                 str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0.2", "--ngram-reference",
                 str(tmp_path / "wiki.jsonl"), "--ngram-order", "3", "--keep-buckets", "head,middle"])
    out, err = capsys.readouterr()
    assert code == 0, err
    removed = next(int(line.split()[2]) for line in out.splitlines() if line.startswith("filter perplexity"))
    assert removed <= -2 and "perplexity buckets (head <= " in out  # the gibberish, and good text in the tail
    code = main(["prepare", str(tmp_path / "web.jsonl"), "--tokenizer", str(tokenizer_file), "--output",
                 str(tmp_path / "out2"), "--max-perplexity", "100"])
    assert code == 1 and "need an n-gram model; pass --ngram-reference" in capsys.readouterr().err


def reference_probability(sentences_list, order, word, context):
    """Interpolated modified Kneser-Ney written straight from the formula with dicts of tuples (a second,
    independent implementation: no hashing, no vectorisation)."""
    from collections import Counter

    grams = Counter()
    for s in sentences_list:
        padded = ["<s>"] * (order - 1) + s + ["</s>"]
        grams.update(tuple(padded[i - order + 1:i + 1]) for i in range(order - 1, len(padded)))
    levels = {order: grams}
    for k in range(order - 1, 0, -1):
        levels[k] = Counter(g[1:] for g in levels[k + 1])  # distinct left extensions
    vocab = {g[0] for g in levels[1]} | {"<unk>"}
    p = 1 / len(vocab)
    for k in range(1, order + 1):
        d1, d2, d3 = kn_discounts(levels[k].values())
        h = tuple(context[len(context) - k + 1:]) if k > 1 else ()
        following = {g[-1]: c for g, c in levels[k].items() if g[:-1] == h}
        total = sum(following.values())
        if not total:
            continue
        c = following.get(word, 0)
        d = (0, d1, d2, d3)[min(c, 3)]
        gamma = sum((d1, d2, d3)[min(n, 3) - 1] for n in following.values()) / total
        p = (c - d) / total + gamma * p
    return p


def test_vectorised_model_equals_the_formula_at_order_4():
    from llamakit.data.ngram import sentences

    texts = [sentences_corpus(15, seed) + "\n" + sentences_corpus(5, seed + 50) for seed in range(20)]
    lm = KneserNeyLM.train(texts, order=4)
    sentence_list = [s for t in texts for s in sentences(t)]
    probe = sentences(sentences_corpus(3, 999))[0] + ["zebra", "the"]
    padded = ["<s>"] * 3 + probe
    for i in range(3, len(padded)):
        context = padded[i - 3:i]
        assert lm.probability(padded[i], context) == pytest.approx(
            reference_probability(sentence_list, 4, padded[i] if padded[i] in lm.vocab else "<unk>", context), rel=1e-9)
