"""The hashed n-gram quality classifier: features by hand, the fitted optimum, separation on held-out documents,
safe files, Llama labels against an unbatched forward, and the CLI end to end."""

import json
import math
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llamakit.cli import main
from llamakit.data.quality import LABEL_PROMPT, QualityClassifier, features, label_documents, train_classifier
from llamakit.errors import DataError
from tests.data.corpus import write_jsonl
from tests.data.test_ngram import gibberish, sentences_corpus


def test_features_by_hand():
    index, values = features("A b a", buckets=2**20)
    grams = {"a": 2, "b": 1, "a b": 1, "b a": 1}  # lower-cased words, then 1- and 2-grams
    expected = {zlib.crc32(g.encode()) % 2**20: 1 + math.log(c) for g, c in grams.items()}
    norm = math.sqrt(sum(v * v for v in expected.values()))
    assert dict(zip(index.tolist(), values.tolist())) == pytest.approx({k: v / norm for k, v in expected.items()})
    assert features("!!!")[0].size == 0


def test_training_reaches_the_penalised_optimum():
    texts = [sentences_corpus(3, seed) for seed in range(12)]
    positive, negative, buckets, l2 = texts[:5], texts[5:], 64, 1e-2
    clf = train_classifier(positive, negative, buckets=buckets, l2=l2)
    X = np.zeros((12, buckets))  # dense, by hand
    for row, text in enumerate(texts):
        index, values = features(text, buckets)
        X[row, index] = values
    y = np.array([1.0] * 5 + [0.0] * 7)
    weight = np.array([0.5 / 5] * 5 + [0.5 / 7] * 7)  # each class half of the loss
    p = 1 / (1 + np.exp(-(X @ clf.weight + clf.bias)))
    grad_w = X.T @ (weight * (p - y)) + l2 * clf.weight  # gradient of the weighted log-loss + l2/2 |w|^2
    grad_b = np.sum(weight * (p - y))
    assert np.abs(grad_w).max() < 1e-4 and abs(grad_b) < 1e-4


def test_separates_held_out_documents_by_word_order():
    # Shuffled copies have the same words as the grammatical ones: only the 2-gram features tell them apart.
    grammatical = [sentences_corpus(6, seed) for seed in range(60)]
    shuffled = [gibberish(sentences_corpus(6, 1000 + seed), seed) for seed in range(60)]
    clf = train_classifier(grammatical[:50], shuffled[:50])
    assert all(clf.score(t) > 0.5 for t in grammatical[50:]) and all(clf.score(t) < 0.5 for t in shuffled[50:])
    unigrams_only = train_classifier(grammatical[:50], shuffled[:50], max_ngram=1)
    accuracy = (sum(unigrams_only.score(t) > 0.5 for t in grammatical[50:]) +
                sum(unigrams_only.score(t) < 0.5 for t in shuffled[50:])) / 20
    assert accuracy < 0.9  # the bag of words alone cannot do it


@pytest.mark.parametrize("name", ["clf.json", "clf.safetensors"])
def test_saved_classifier_scores_the_same(name, tmp_path):
    clf = train_classifier([sentences_corpus(4, s) for s in range(6)], [gibberish(sentences_corpus(4, s), s)
                                                                        for s in range(6, 12)], buckets=4096)
    clf.save(tmp_path / name)
    loaded = QualityClassifier.load(tmp_path / name)
    text = sentences_corpus(4, 99)
    assert loaded.score(text) == pytest.approx(clf.score(text), abs=1e-7) and loaded.buckets == 4096
    if name.endswith(".json"):  # plain data, no pickle: the weights that are not zero, by bucket
        data = json.loads((tmp_path / name).read_text())
        assert data["format"] == "llamakit-quality-classifier" and len(data["weights"]) == np.count_nonzero(clf.weight)
    else:
        with safe_open(tmp_path / name, framework="numpy") as f:
            assert set(f.keys()) == {"weight", "bias"} and f.metadata()["max_ngram"] == "2"
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a quality classifier"):
        QualityClassifier.load(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def stories(assets):
    from llamakit.checkpoint import load_checkpoint

    folder = assets / "tinyllamas"
    return load_checkpoint(folder / "stories260K.bin", folder / "tok512.model")


def test_labels_are_the_answer_logprobs_of_an_unbatched_forward(stories):
    model, tokenizer = stories
    texts = ["Tom had a red ball.", "Lily baked a big cake for her mom and her dad, and they all ate it together."]
    scores = label_documents(model, tokenizer, texts, batch_size=2)  # padded batch
    for text, score in zip(texts, scores):
        prompt = LABEL_PROMPT.format(text=text)
        context = tokenizer.encode(prompt, bos=True)
        yes = tokenizer.encode(prompt + " Yes", bos=True)[len(context):]
        no = tokenizer.encode(prompt + " No", bos=True)[len(context):]
        k = next(i for i, (a, b) in enumerate(zip(yes, no)) if a != b)  # stories' tokenizer: "▁" then "Y" / "N"
        context, yes, no = context + yes[:k], yes[k], no[k]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context]))[0, -1], dim=-1)
        assert score == pytest.approx(float(logprobs[yes] - logprobs[no]), abs=1e-4)
    with pytest.raises(DataError, match="must contain {text}"):
        label_documents(model, tokenizer, texts, "no placeholder Answer:")


def test_cli_trains_and_prepare_filters(tokenizer_file, tmp_path, capsys):
    good = [sentences_corpus(6, seed) for seed in range(40)]
    bad = [gibberish(sentences_corpus(6, 500 + seed), seed) for seed in range(40)]
    write_jsonl(tmp_path / "good.jsonl", good)
    write_jsonl(tmp_path / "bad.jsonl", bad)
    code = main(["prepare-classifier", "--positive", str(tmp_path / "good.jsonl"), "--negative",
                 str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "clf.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and "accuracy 100.0% of" in out and "wrote" in out
    corpus = [sentences_corpus(6, 2000 + s) for s in range(6)] + [gibberish(sentences_corpus(6, 3000 + s), s)
                                                                  for s in range(4)]
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    code = main(["prepare", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(tokenizer_file), "--output",
                 str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0.2", "--quality-classifier",
                 str(tmp_path / "clf.safetensors"), "--min-quality", "0.5"])
    out = capsys.readouterr().out
    assert code == 0 and any(line.split()[:3] == ["filter", "quality_classifier", "-4"] for line in out.splitlines())
    code = main(["prepare-classifier", "--positive", str(tmp_path / "good.jsonl"), "--output", str(tmp_path / "x.json")])
    assert code == 1 and "give --positive and --negative documents" in capsys.readouterr().err


def test_cli_labels_with_a_llama_checkpoint(stories, assets, tmp_path, capsys):
    model, tokenizer = stories
    docs = [sentences_corpus(3, seed) for seed in range(6)] + [gibberish(sentences_corpus(3, s), s) for s in range(6)]
    scores = label_documents(model, tokenizer, docs)
    middle = float(np.median(scores))  # a threshold that puts half of them on each side
    write_jsonl(tmp_path / "docs.jsonl", docs)
    folder = assets / "tinyllamas"
    code = main(["prepare-classifier", "--label-with", str(folder / "stories260K.bin"), "--documents",
                 str(tmp_path / "docs.jsonl"), "--label-threshold", str(middle), "--output", str(tmp_path / "c.json"),
                 "--tokenizer", str(folder / "tok512.model"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"labelled {sum(s > middle for s in scores)} of 12 documents high quality" in out
    assert QualityClassifier.load(tmp_path / "c.json").buckets == 2**20
