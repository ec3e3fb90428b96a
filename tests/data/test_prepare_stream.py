"""Streaming prepare: bounded memory on a corpus larger than what it may hold, bounded work in flight, and a split
that matches the list rule."""

import dataclasses
import json
import os
import random
import subprocess
import sys
import tracemalloc

import pytest

from llamakit.data import FilterConfig, prepare, read_meta
from llamakit.data.pipeline import bounded_map
from llamakit.data.prepare import split_documents
from tests.data.corpus import WORDS
from tests.data.test_prepare import config_for, documents_in, prepare_module


def write_big_corpus(path, documents: int, words: int) -> int:
    """documents one-line documents of random words, written one at a time; the file's size in bytes."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(rng.choices(WORDS, k=words)) + "."}) + "\n")
    return path.stat().st_size


def peak_python_memory(corpus, tokenizer_file, output) -> tuple[int, dict]:
    """The most memory Python objects (str, list, numpy arrays, ...) held at once while preparing corpus."""
    config = config_for(corpus, tokenizer_file, output, shard_tokens=100_000, workers=1,
                        filters=FilterConfig(min_alnum_fraction=None, max_top_ngram_fraction=None))  # for speed
    tracemalloc.start()
    try:
        report = prepare(config)
        return tracemalloc.get_traced_memory()[1], report
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_corpus(tokenizer_file, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_DOCS", 2)
    small = write_big_corpus(tmp_path / "small.jsonl", documents=5, words=3000)
    large = write_big_corpus(tmp_path / "large.jsonl", documents=25, words=3000)  # 5x: about 0.35 MB more text
    peak_python_memory(tmp_path / "small.jsonl", tokenizer_file, tmp_path / "warm")  # imports (scipy: ~15 MB)
    small_peak, _ = peak_python_memory(tmp_path / "small.jsonl", tokenizer_file, tmp_path / "a")
    large_peak, report = peak_python_memory(tmp_path / "large.jsonl", tokenizer_file, tmp_path / "b")
    # Holding the corpus (as the in-memory version did: raw, then cleaned) grows the peak by twice the extra
    # text at least; streaming adds only a digest and a MinHash signature (~5 kB with its LSH entries) per document.
    assert report["kept"]["documents"] == 25
    assert large_peak - small_peak < (large - small) / 2, (small_peak, large_peak, large - small)


@pytest.mark.slow
def test_prepare_in_a_process_capped_well_below_the_corpus(tokenizer_file, tmp_path):
    corpus = tmp_path / "big.jsonl"
    size = write_big_corpus(corpus, documents=400, words=16000)  # about 38 MB in 400 documents
    # Chunks of 4 documents keep what is in flight small, so the peak shows what grows with the corpus.
    script = ("import importlib, resource, sys\nfrom llamakit.cli import main\n"
              "importlib.import_module('llamakit.data.prepare').CHUNK_DOCS = 4\ncode = main(sys.argv[1:])\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")

    def peak_rss_kib(path, out):
        args = ["prepare", str(path), "--tokenizer", str(tokenizer_file), "--output", str(out), "--workers", "1",
                "--val-fraction", "0.1"]
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(done.stdout.strip().splitlines()[-1])

    write_big_corpus(tmp_path / "small.jsonl", documents=16, words=16000)
    growth = (peak_rss_kib(corpus, tmp_path / "big") - peak_rss_kib(tmp_path / "small.jsonl", tmp_path / "small")) * 1024
    assert growth < size / 4, (growth, size)  # in memory, the corpus alone would add its size (twice: raw, cleaned)


def test_bounded_map_keeps_few_items_in_flight():
    in_flight, most = [], [0]

    class Pending:
        def __init__(self, item):
            self.item = item
            in_flight.append(item)
            most[0] = max(most[0], len(in_flight))

        def get(self):
            in_flight.remove(self.item)
            return self.item * 2

    def endless():
        yield from range(10_000)

    assert list(bounded_map(Pending, endless(), ahead=3)) == [2 * i for i in range(10_000)]
    assert most[0] == 3


@pytest.mark.parametrize("val_fraction", [0.005, 0.3, 0.95])
def test_streamed_split_is_the_list_rule(val_fraction, tokenizer_file, tokenizer, tmp_path):
    from tests.data.corpus import prose, write_jsonl

    docs = [prose(60, seed) for seed in range(12)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    prepare(config_for(tmp_path / "in.jsonl", tokenizer_file, tmp_path / "out", val_fraction=val_fraction))
    expected = split_documents(docs, val_fraction)  # at least one of each split, decided by each text's hash
    assert documents_in(tmp_path / "out", "val", tokenizer) == expected["val"]
    assert documents_in(tmp_path / "out", "train", tokenizer) == expected["train"]


def test_report_counts_every_stage(tokenizer_file, tmp_path):
    from tests.data.test_ngram import gibberish, sentences_corpus

    good = [sentences_corpus(8, seed) for seed in range(12)]
    reference = tmp_path / "reference.jsonl"
    reference.write_text("".join(json.dumps({"text": sentences_corpus(8, 100 + s)}) + "\n" for s in range(40)))
    docs = [*good, gibberish(good[0], 1), gibberish(good[1], 2), good[2], "Hi."]
    from tests.data.corpus import write_jsonl

    write_jsonl(tmp_path / "in.jsonl", docs)
    config = config_for(tmp_path / "in.jsonl", tokenizer_file, tmp_path / "out")
    config.models.ngram_reference = [str(reference)]
    config.models.keep_buckets = ("head", "middle")
    report = prepare(config)
    assert report["documents_read"] == 16 and report["filters"]["min_chars"]["documents"] == 1
    assert report["filters"]["perplexity"]["documents"] >= 2  # both gibberish documents, perhaps a tail one too
    assert report["exact_duplicates"]["documents"] == 1 and report["semantic_duplicates"]["documents"] == 0
    assert report["kept"]["documents"] == 16 - 1 - 1 - report["filters"]["perplexity"]["documents"]
    assert sum(report["perplexity"]["buckets"].values()) == 15  # every document that reached the n-gram filter
    assert read_meta(tmp_path / "out")["settings"]["models"]["keep_buckets"] == ["head", "middle"]
    two = prepare(dataclasses.replace(config, output=tmp_path / "two", workers=2))  # the models travel to workers
    assert two == report and all((tmp_path / "two" / p.name).read_bytes() == p.read_bytes()
                                 for p in (tmp_path / "out").glob("*.bin"))
