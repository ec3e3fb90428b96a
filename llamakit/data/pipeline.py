"""The per-document stages of `prepare` and the state that joins them, for streaming in bounded memory.

`DocumentStages.clean(position, raw)` is a pure function of one document (given the settings and the
models built once before the run): normalise, drop boilerplate lines, heuristic, language, perplexity and
classifier filters, then the keys dedup needs. It is what worker processes run, and what a distributed
engine (Ray Data, Spark) would map over documents. What depends on earlier documents runs in order in
one process: `StreamDeduplicator` (exact digests, MinHash LSH, semantic embeddings of kept documents) and
`SplitWriter` (the validation split, fixed per document by a hash of its text). `mapper` and `bounded_map` run
the per-document stages in worker processes with a bounded number of chunks in flight.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llamakit.data import shards
from llamakit.data.clean import (
    FILTER_NAMES,
    BoilerplateStats,
    FilterConfig,
    LanguageFilter,
    drop_common_lines,
    normalize_text,
    quality_issue,
)
from llamakit.data.dedup import DedupConfig, Removed, exact_key, signature
from llamakit.data.ngram import BUCKETS, PerplexityModel
from llamakit.data.quality import QualityClassifier
from llamakit.errors import DataError

MODEL_FILTERS = ("perplexity", "quality_classifier")
STAGE_FILTERS = (*FILTER_NAMES, *MODEL_FILTERS)  # the report's filters, in the order they are checked
PENDING_TOKENS = 16_000_000  # tokens held back at most until both splits have a document (see SplitWriter)


@dataclasses.dataclass
class Outcome:
    """What the per-document stages found out about one document."""

    chars_read: int
    boilerplate: BoilerplateStats
    issue: str | None = None  # the filter it failed (STAGE_FILTERS), None when it passed
    text: str | None = None  # the cleaned text (dropped after tokenising unless semantic dedup needs it)
    chars: int = 0
    perplexity: float | None = None
    bucket: str | None = None
    quality: float | None = None
    key: bytes | None = None  # exact-dedup digest
    signature: Any = None  # MinHash signature, when near dedup is on
    ids: np.ndarray | None = None  # [bos] + tokens + [eos]
    split_hash: float = 0.0  # in [0, 1): below val_fraction puts it in the validation split


_LANGUAGE_FILTERS: dict[tuple, LanguageFilter] = {}  # one langid model per process


def document_issue(text: str, config: FilterConfig) -> str | None:
    """The first filter (FILTER_NAMES) that text fails, the language filter last; None when it passes."""
    issue = quality_issue(text, config)
    if issue is None and config.languages:
        key = (tuple(config.languages), config.min_language_score)
        if key not in _LANGUAGE_FILTERS:
            _LANGUAGE_FILTERS[key] = LanguageFilter(*key)
        issue = None if _LANGUAGE_FILTERS[key].keeps(text) else "language"
    return issue


def unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by text alone (not by its position, the run or the machine)."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclasses.dataclass
class DocumentStages:
    """Everything the per-document stages need: settings and the models built before the run."""

    filters: FilterConfig
    dedup: DedupConfig
    nfc: bool = True
    common_lines: dict[bytes, int] = dataclasses.field(default_factory=dict)  # boilerplate digest -> first holder
    boilerplate_min_chars: int = 30
    perplexity: PerplexityModel | None = None
    max_perplexity: float | None = None
    keep_buckets: tuple[str, ...] = BUCKETS
    classifier: QualityClassifier | None = None
    min_quality: float = 0.5

    def clean(self, position: int, raw: str) -> Outcome:
        """One document through normalisation, boilerplate removal and every filter, with its dedup keys."""
        out = Outcome(chars_read=len(raw), boilerplate=BoilerplateStats())
        text = normalize_text(raw, self.nfc)
        text = drop_common_lines(text, position, self.common_lines, self.boilerplate_min_chars, out.boilerplate)
        out.chars = len(text)
        out.issue = document_issue(text, self.filters) or self._model_issue(text, out)
        if out.issue is None:
            out.text, out.key, out.split_hash = text, exact_key(text), unit_hash(text)
            if self.dedup.near:
                out.signature = signature(text, self.dedup)
        return out

    def _model_issue(self, text: str, out: Outcome) -> str | None:
        """"perplexity" or "quality_classifier" when text fails that filter (scores recorded in out)."""
        if self.perplexity is not None:
            out.perplexity = self.perplexity.lm.perplexity(text)
            out.bucket = self.perplexity.bucket(out.perplexity)
            too_high = self.max_perplexity is not None and not out.perplexity <= self.max_perplexity
            if too_high or out.bucket not in self.keep_buckets:
                return "perplexity"
        if self.classifier is not None:
            out.quality = self.classifier.score(text)
            if out.quality < self.min_quality:
                return "quality_classifier"
        return None


def bounded_map(submit: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """Results of submit(item).get() in order, with at most `ahead` items in flight: memory stays bounded
    however long items is (Pool.imap would read the input as fast as it can and queue every result)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def worker_count(workers: int | None) -> int:
    """The number of worker processes: workers, or all CPUs."""
    return workers or os.cpu_count() or 1


@contextlib.contextmanager
def mapper(workers: int | None, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[Callable]:
    """submit(fn, item) -> an object whose .get() is fn(item): in this process for one worker, else in a pool whose
    workers each ran initializer(*initargs) once (so large state travels once per worker, not per task)."""
    workers = worker_count(workers)
    if workers == 1:
        if initializer is not None:
            initializer(*initargs)
        yield lambda fn, item: _Done(fn(item))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs)) as pool:
        yield lambda fn, item: pool.apply_async(fn, (item,))  # leaving the block terminates the workers


class _Done:
    """A result computed in this process, shaped like AsyncResult."""

    def __init__(self, value: Any):
        self.value = value

    def get(self) -> Any:
        return self.value


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    """In a worker: Ctrl-C reaches the whole process group, and only the parent should handle it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


class StreamDeduplicator:
    """Exact, MinHash and (optionally) semantic dedup in corpus order; keeps digests, signatures and embeddings of
    kept documents, never their text. Semantic dedup decides a batch at a time, so documents come out later."""

    def __init__(self, config: DedupConfig, semantic=None, embedder=None, batch: int = 64):
        from datasketch import MinHashLSH

        self.config = config
        self.removed = {"exact_duplicates": Removed(), "near_duplicates": Removed(), "semantic_duplicates": Removed()}
        self._seen: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm) if config.near else None
        self._signatures: dict[int, Any] = {}
        self._semantic, self._embedder, self._batch = semantic, embedder, batch
        self._waiting: list[Outcome] = []

    def add(self, doc: Outcome) -> list[Outcome]:
        """The documents now known to be kept (doc, or a batch once semantic dedup has judged it)."""
        if self.config.exact:
            if doc.key in self._seen:
                return self._drop("exact_duplicates", doc)
            self._seen.add(doc.key)
        if self._lsh is not None:
            sig = doc.signature
            if any(self._signatures[k].jaccard(sig) >= self.config.threshold for k in self._lsh.query(sig)):
                return self._drop("near_duplicates", doc)
            self._lsh.insert(len(self._signatures), sig)
            self._signatures[len(self._signatures)] = sig
        doc.signature = None
        if self._semantic is None:
            return [doc]
        self._waiting.append(doc)
        return self.flush() if len(self._waiting) >= self._batch else []

    def flush(self) -> list[Outcome]:
        """The waiting documents that semantic dedup keeps."""
        if not self._waiting:
            return []
        docs, self._waiting = self._waiting, []
        keep = self._semantic.select(self._embedder.embed([d.text for d in docs]))
        for doc, kept in zip(docs, keep):
            if not kept:
                self.removed["semantic_duplicates"].documents += 1
                self.removed["semantic_duplicates"].chars += doc.chars
        return [d for d, k in zip(docs, keep) if k]

    def _drop(self, stage: str, doc: Outcome) -> list[Outcome]:
        self.removed[stage].documents += 1
        self.removed[stage].chars += doc.chars
        return []


class SplitWriter:
    """Writes each kept document's ids to the split its hash chose, in corpus order.

    As split_documents does for a list, a run whose hashes put every document in one split moves one
    (the lowest hash to val, or the highest to train). To do that without holding the corpus, documents
    are held back only until both splits have one (PENDING_TOKENS at most; with --val-fraction 0.005
    that is a few hundred documents); a corpus that fills that much without a validation document is an error.
    """

    def __init__(self, folder: Path, dtype: str, shard_tokens: int, val_fraction: float):
        self.val_fraction = val_fraction
        self.writers = {name: shards.ShardWriter(folder, name, dtype, shard_tokens) for name in shards.SPLITS}
        self.documents = dict.fromkeys(shards.SPLITS, 0)
        self.tokens = dict.fromkeys(shards.SPLITS, 0)
        self.added = self.chars = 0  # documents added, and their characters
        self._pending: list[tuple[np.ndarray, bool, float]] | None = []
        self._pending_tokens = 0

    def add(self, doc: Outcome) -> None:
        """Write doc's ids (now, or once both splits have a document)."""
        val = doc.split_hash < self.val_fraction
        self.added += 1
        self.chars += doc.chars
        if self._pending is None:
            return self._write(doc.ids, val)
        self._pending.append((doc.ids, val, doc.split_hash))
        self._pending_tokens += doc.ids.size
        if len({val for _, val, _ in self._pending}) == 2 or self._pending_tokens > PENDING_TOKENS:
            self._release()

    def close(self) -> dict[str, dict]:
        """Finish both splits; their meta.json entries."""
        if self._pending is not None:
            pending = self._pending
            if len(pending) < 2:
                raise DataError(f"only {len(pending)} document is left after cleaning, so none can be held out for "
                                "validation, which pretraining needs; add documents (a text file is one document "
                                "unless --separator cuts it)")
            scores = [score for _, _, score in pending]
            lone = scores.index(min(scores)) if not pending[0][1] else scores.index(max(scores))
            ids, val, score = pending[lone]
            pending[lone] = (ids, not val, score)
            self._release()
        empty = [name for name, n in self.documents.items() if not n]
        if empty:
            raise DataError(f"none of the {self.added:,} kept documents fell into the {empty[0]} split by its hash, "
                            f"and more than {PENDING_TOKENS:,} tokens came before the split could be fixed; "
                            f"{'raise' if empty[0] == 'val' else 'lower'} --val-fraction")
        return {name: {"tokens": self.tokens[name], "documents": self.documents[name], "shards": w.close()}
                for name, w in self.writers.items()}

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def _release(self) -> None:
        pending, self._pending = self._pending, None
        for ids, val, _ in pending:
            self._write(ids, val)

    def _write(self, ids: np.ndarray, val: bool) -> None:
        name = "val" if val else "train"
        self.writers[name].write(ids)
        self.documents[name] += 1
        self.tokens[name] += ids.size


@dataclasses.dataclass
class ModelFilterConfig:
    """Model-based filters (off by default): CCNet's n-gram perplexity and a linear quality classifier."""

    ngram_reference: list[str] = dataclasses.field(default_factory=list)  # text the n-gram model learns (Wikipedia)
    ngram_order: int = 5
    max_perplexity: float | None = None  # drop documents above this perplexity
    keep_buckets: tuple[str, ...] = BUCKETS  # keep documents in these perplexity buckets
    quality_classifier: str | None = None  # a file from `llamakit prepare-classifier`
    min_quality: float = 0.5  # drop documents the classifier scores below this


@dataclasses.dataclass
class SemanticConfig:
    """Semantic dedup with a Llama checkpoint's embeddings (off by default)."""

    checkpoint: str | None = None
    threshold: float = 0.95  # cosine similarity at or above which a document duplicates a kept one
    max_tokens: int = 512  # tokens of each document embedded
    batch_size: int = 16


def check_model_filters(config: ModelFilterConfig, semantic: SemanticConfig) -> None:
    """DataError for model-filter settings that cannot work."""
    unknown = set(config.keep_buckets) - set(BUCKETS)
    if unknown or not config.keep_buckets:
        raise DataError(f"--keep-buckets takes some of {', '.join(BUCKETS)}, got {', '.join(config.keep_buckets)}")
    wants_ngram = config.max_perplexity is not None or set(config.keep_buckets) != set(BUCKETS)
    if wants_ngram and not config.ngram_reference:
        raise DataError("--max-perplexity and --keep-buckets need an n-gram model; pass --ngram-reference FILES "
                        "(clean text such as Wikipedia)")
    if not 1 <= config.ngram_order <= 10:
        raise DataError(f"--ngram-order must be between 1 and 10 (CCNet uses 5), got {config.ngram_order}")
    if not 0 <= config.min_quality <= 1:
        raise DataError(f"--min-quality is a probability in [0, 1], got {config.min_quality}")
    if not -1 <= semantic.threshold <= 1:
        raise DataError(f"--semantic-threshold is a cosine similarity in [-1, 1], got {semantic.threshold}")


def build_stages(config: ModelFilterConfig, read: Callable[[list[str]], Iterator[str]]) -> dict[str, Any]:
    """The DocumentStages fields for the model filters: the n-gram model trained on the reference (read by `read`,
    normalised as the corpus is), and the classifier loaded."""
    from llamakit.data.ngram import HELD_OUT_EVERY, train_perplexity_model

    fields: dict[str, Any] = {"max_perplexity": config.max_perplexity, "keep_buckets": tuple(config.keep_buckets),
                              "min_quality": config.min_quality}
    if config.ngram_reference:
        reference = list(read(config.ngram_reference))
        if len(reference) < HELD_OUT_EVERY:
            raise DataError(f"the n-gram reference holds {len(reference)} documents; it needs at least "
                            f"{HELD_OUT_EVERY} (one in {HELD_OUT_EVERY} places the bucket cutoffs): add text, or "
                            "cut it into documents with --separator")
        try:
            fields["perplexity"] = train_perplexity_model(reference, config.ngram_order)
        except ValueError as err:
            raise DataError(f"the n-gram reference cannot be used: {err}; give it documents with words") from None
    if config.quality_classifier:
        fields["classifier"] = QualityClassifier.load(Path(config.quality_classifier))
    return fields
