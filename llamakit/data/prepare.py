"""`prepare`: raw text files -> cleaned, deduplicated, tokenised, packed shards (see shards.py), streamed.

Stages, in order: read -> normalise -> drop boilerplate lines -> heuristic/language filters -> n-gram
perplexity and quality-classifier filters (optional) -> exact dedup -> near dedup (MinHash) -> semantic
dedup (optional) -> train/val split by a hash of each document -> shards -> meta.json.

Documents stream through in bounded memory: worker processes run the per-document stages
(pipeline.DocumentStages.clean, then tokenising) on chunks, at most 2 x workers chunks in flight, and the
main process applies dedup in corpus order and appends ids to the shards. What grows with the corpus is
dedup state, never text: the boilerplate pass's 8-byte digest per distinct long line, a 16-byte digest
and a MinHash signature (8 x num_perm bytes) per kept document, and with semantic dedup its embedding.
Boilerplate needs line counts over the whole corpus before any document is cleaned, so the inputs are
read twice (once when --boilerplate-min-docs is 0). The output does not depend on the number of workers.
The new folder is built beside the output (`.NAME.tmp-PID`) and renamed into place when complete, so an
earlier result survives until then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llamakit.data import shards
from llamakit.data.clean import FilterConfig, common_lines, line_digests, normalize_text
from llamakit.data.dedup import DedupConfig, exact_key
from llamakit.data.ngram import BUCKETS
from llamakit.data.pipeline import (
    STAGE_FILTERS,
    DocumentStages,
    ModelFilterConfig,
    Outcome,
    SemanticConfig,
    SplitWriter,
    StreamDeduplicator,
    bounded_map,
    build_stages,
    check_model_filters,
    document_issue,
    mapper,
    unit_hash,
    worker_count,
)
from llamakit.data.sources import input_fingerprint, read_documents, resolve_inputs
from llamakit.errors import DataError
from llamakit.files import atomic_directory, remove_stale_temporaries, write_atomic
from llamakit.tokenizer import load_tokenizer

__all__ = ["CHUNK_DOCS", "PrepareConfig", "clean_corpus", "document_issue", "encode_documents", "prepare",
           "settings_of", "split_documents"]

logger = logging.getLogger(__name__)

CHUNK_DOCS = 64  # documents per task sent to a worker
# What a prepared folder may hold; anything else means the output points at someone else's folder.
_OURS = re.compile(r"(meta\.json|tokenizer\.model|(train|val)-\d{5}\.bin|\..*\.tmp(-\d+)?)")
# Settings that do not change the output, so changing them does not make a prepared folder stale.
_NOT_COMPARED = ("inputs", "output", "tokenizer", "workers", "force")


@dataclasses.dataclass
class PrepareConfig:
    """What to prepare and how. Filter and dedup defaults are documented in clean.py, dedup.py and pipeline.py."""

    inputs: list[str]  # files, folders, glob patterns (see sources.py)
    output: Path
    tokenizer: Path  # a tokenizer file, or a checkpoint folder holding tokenizer.model
    field: str = "text"  # JSON / Parquet field holding the text
    separator: str | None = None  # cut text files into documents at this string (default: one per file)
    max_documents: int | None = None  # read at most this many documents (for trial runs)
    nfc: bool = True  # Unicode NFC normalisation
    boilerplate_min_docs: int = 10  # drop lines found in this many documents or more (CCNet); 0 disables
    boilerplate_min_chars: int = 30  # shorter lines are never boilerplate (keeps code's "return x", "}")
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    models: ModelFilterConfig = dataclasses.field(default_factory=ModelFilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    val_fraction: float = 0.005  # share of documents held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file
    workers: int | None = None  # processes for the per-document stages and tokenising (default: all CPUs)
    force: bool = False  # re-prepare an output folder that holds other data


def prepare(config: PrepareConfig, embedder=None) -> dict[str, Any]:
    """Prepare config.inputs into config.output; returns the report (what each stage removed, tokens per split).

    With config.semantic.checkpoint, embedder is a semantic.Embedder over that checkpoint's model, or a function
    returning one, called only if the corpus is read (the CLI loads it; the data layer does not load checkpoints).
    """
    _check_config(config)
    if config.semantic.checkpoint and embedder is None:
        raise DataError("semantic dedup needs the model: pass embedder=Embedder(*load_checkpoint(path)) "
                        "(llamakit.data.semantic, llamakit.checkpoint), as `llamakit prepare --semantic-dedup` does")
    output = Path(config.output)
    files = _outside(resolve_inputs(config.inputs), output)
    tokenizer = load_tokenizer(config.tokenizer)
    identity = {"settings": settings_of(config), "inputs": input_fingerprint(files),
                "tokenizer_sha256": shards.file_sha256(tokenizer.path), "model_inputs": _model_inputs(config)}
    existing = _prepared_meta(output)
    if existing is not None and not config.force:  # decided from meta.json and a listing: nothing is read
        _check_same(output, existing, identity)
        _check_intact(output, existing)
        logger.info("%s is already prepared with these inputs and settings; nothing to do", output)
        return existing["report"]
    _check_output(output)
    with _building(output) as folder:
        write_atomic(folder / shards.TOKENIZER_FILE, tokenizer.path.read_bytes())
        report, splits = clean_corpus(files, config, folder, embedder)
        shards.write_meta(folder, _meta(tokenizer, identity, splits, report, config))
    logger.info("prepared %s: %s", output, report["splits"])
    return report


def _model_inputs(config: PrepareConfig) -> list[dict]:
    """Fingerprints of the files the model filters read (reference text, classifier), which change the output."""
    files = resolve_inputs(config.models.ngram_reference) if config.models.ngram_reference else []
    if config.models.quality_classifier and Path(config.models.quality_classifier).is_file():
        files.append(Path(config.models.quality_classifier).resolve())
    return input_fingerprint(files)

def _outside(files: list[Path], output: Path) -> list[Path]:
    """files without those inside output (an output folder under an input folder is not input)."""
    inside = [f for f in files if output.resolve() in f.parents]
    if inside:
        logger.info("skipping %d files inside the output folder %s", len(inside), output)
    return [f for f in files if f not in inside] or files


def settings_of(config: PrepareConfig) -> dict[str, Any]:
    """The resolved settings as JSON-ready values (what meta.json records)."""
    settings = dataclasses.asdict(config)
    settings["inputs"] = [str(spec) for spec in config.inputs]
    return json.loads(json.dumps(settings, default=str))  # Paths as str, tuples as lists: as meta.json reads back


def _check_config(config: PrepareConfig) -> None:
    """DataError for settings that cannot work."""
    if not math.isfinite(config.val_fraction):
        raise DataError(f"--val-fraction {config.val_fraction} is not a number; use a fraction such as 0.005")
    if config.val_fraction <= 0:
        raise DataError(f"--val-fraction {config.val_fraction} leaves no validation split, which pretraining needs to "
                        "measure validation loss; use a value above 0 (the default is 0.005)")
    if config.val_fraction >= 1:
        raise DataError(f"--val-fraction {config.val_fraction} leaves nothing to train on; use a value below 1")
    if config.shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {config.shard_tokens}")
    if not 0 < config.dedup.threshold <= 1:
        raise DataError(f"the near-duplicate threshold must be in (0, 1], got {config.dedup.threshold}")
    if config.dedup.ngram < 1 or config.dedup.unit not in ("word", "char"):
        raise DataError(f"near-dedup shingles must be n >= 1 words or chars, got n={config.dedup.ngram} "
                        f"unit={config.dedup.unit!r}")
    check_model_filters(config.models, config.semantic)


# --- resuming -----------------------------------------------------------------------------------------

def _prepared_meta(output: Path) -> dict[str, Any] | None:
    """The meta.json of a complete earlier run in output, or None when there is none."""
    if not (output / shards.META_FILE).is_file():
        return None
    try:
        return shards.read_meta(output)
    except DataError:
        return {}  # unreadable or another version: differs from anything we would write


def _check_same(output: Path, meta: dict[str, Any], identity: dict[str, Any]) -> None:
    """DataError naming what changed since output was prepared."""
    if not meta:
        raise DataError(f"{output} holds a meta.json that this version cannot read; pass --force to prepare it "
                        "again, or choose a new --output")
    changes = []
    old_settings = {k: v for k, v in meta.get("settings", {}).items() if k not in _NOT_COMPARED}
    new_settings = {k: v for k, v in identity["settings"].items() if k not in _NOT_COMPARED}
    if old_settings != new_settings:
        changes.append("settings (" + ", ".join(_differences(old_settings, new_settings)[:4]) + ")")
    if meta.get("inputs") != identity["inputs"]:
        changes.append(_input_changes(meta.get("inputs") or [], identity["inputs"]))
    if meta.get("model_inputs", []) != identity["model_inputs"]:
        changes.append("n-gram reference or quality classifier files")
    if meta.get("tokenizer", {}).get("sha256") != identity["tokenizer_sha256"]:
        changes.append("the tokenizer")
    if changes:
        raise DataError(f"{output} was prepared from different {'; '.join(changes)}; pass --force to prepare it "
                        "again, or choose a new --output")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: old -> new' for each setting that differs, nested sections flattened."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _input_changes(old: list[dict], new: list[dict]) -> str:
    """A phrase saying which input files were added, removed or modified."""
    before, after = {e["path"]: e for e in old}, {e["path"]: e for e in new}
    parts = [f"{what} {Path(paths[0]).name}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
             for what, paths in (("added", sorted(set(after) - set(before))),
                                 ("removed", sorted(set(before) - set(after))),
                                 ("modified", sorted(p for p in set(before) & set(after) if before[p] != after[p])))
             if paths]
    return f"inputs ({', '.join(parts)})"


def _check_intact(output: Path, meta: dict[str, Any]) -> None:
    """DataError unless every shard meta.json lists is there at its size and the tokenizer copy is unchanged."""
    for split in meta.get("splits", {}):
        shards.TokenShards(output, split)
    shards.check_tokenizer_copy(output, meta)


# --- the output folder --------------------------------------------------------------------------------

def _check_output(output: Path) -> None:
    """DataError, before any long work, when output is a file or a folder holding files prepare did not write."""
    if output.exists() and not output.is_dir():
        raise DataError(f"{output} is a file; choose a folder for the prepared data")
    foreign = sorted(p.name for p in output.iterdir() if not _OURS.fullmatch(p.name)) if output.exists() else []
    if foreign:
        raise DataError(f"{output} holds files that `llamakit prepare` did not write ({', '.join(foreign[:3])}); "
                        "choose a new or empty output folder")


@contextlib.contextmanager
def _building(output: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces output only once the block finishes (else it is removed)."""
    output = output.resolve()
    remove_stale_temporaries(output.parent, output.name)
    full = partial(DataError, f"{output}: the disk holding {output.parent} is full (or your quota there is used up); "
                   "the earlier data, if any, is kept; free some space or choose an output on another disk")
    with atomic_directory(output, full=full, unwritable=lambda err: DataError(
            f"cannot create {err.filename} ({err.strerror}): the new data is built beside {output.name} and then "
            "renamed; choose an output in a writable folder")) as tmp:
        yield tmp

def clean_corpus(files: list[Path], config: PrepareConfig, folder: Path, embedder=None) -> tuple[dict, dict]:
    """Stream files through every stage into shards in folder; the report and the splits' meta.json entries."""
    report: dict[str, Any] = {"files": len(files), "documents_read": 0, "chars_read": 0,
                              "boilerplate": {"distinct_lines": 0, "lines_dropped": 0, "chars_dropped": 0},
                              "filters": {name: {"documents": 0, "chars": 0} for name in STAGE_FILTERS}}
    stages = _document_stages(files, config, report)
    dedup = _deduplicator(config, embedder)
    tokens = {"tokenizer_path": str(folder / shards.TOKENIZER_FILE),
              "sha256": shards.file_sha256(folder / shards.TOKENIZER_FILE),
              "dtype": shards.token_dtype(load_tokenizer(folder / shards.TOKENIZER_FILE).vocab_size)}
    writer = SplitWriter(folder, tokens["dtype"], config.shard_tokens, config.val_fraction)
    try:
        with mapper(config.workers, _set_stages, (stages, tokens, config.semantic.checkpoint is not None)) as submit:
            for doc in _outcomes(files, config, submit):
                _count(report, doc)
                for kept in dedup.add(doc) if doc.issue is None else []:
                    writer.add(kept)
            for kept in dedup.flush():
                writer.add(kept)
        _check_left(report)
        report.update({stage: dataclasses.asdict(r) for stage, r in dedup.removed.items()})
        report["kept"] = {"documents": writer.added, "chars": writer.chars}
        splits = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        _WORKER.clear()  # with one worker the stages (and their models) live in this process
    report["splits"] = {name: {k: v for k, v in s.items() if k != "shards"} for name, s in splits.items()}
    logger.info("cleaning kept %d of %d documents", report["kept"]["documents"], report["documents_read"])
    return report, splits


def _document_stages(files: list[Path], config: PrepareConfig, report: dict) -> DocumentStages:
    """The per-document stages: boilerplate lines counted (pass 1), the n-gram model trained, the classifier loaded."""
    common = _boilerplate_lines(files, config)
    report["boilerplate"]["distinct_lines"] = len(common)
    stages = DocumentStages(config.filters, config.dedup, config.nfc, common, config.boilerplate_min_chars,
                            **build_stages(config.models, partial(_reference, config=config)))
    if stages.perplexity is not None:
        report["perplexity"] = {"cutoffs": list(stages.perplexity.cutoffs), "buckets": dict.fromkeys(BUCKETS, 0)}
    return stages


def _deduplicator(config: PrepareConfig, embedder) -> StreamDeduplicator:
    """Exact and near dedup, and semantic dedup when config asks (embedder may be a factory, called only now)."""
    if not config.semantic.checkpoint:
        return StreamDeduplicator(config.dedup)
    from llamakit.data.semantic import SemanticDeduplicator

    if not hasattr(embedder, "embed"):
        embedder = embedder()  # a factory: the model is loaded only now that the run needs it
    return StreamDeduplicator(config.dedup, SemanticDeduplicator(config.semantic.threshold), embedder)


def _documents(files: list[Path], config: PrepareConfig) -> Iterator[str]:
    """The raw documents of files, at most config.max_documents."""
    return itertools.islice(read_documents(files, config.field, config.separator), config.max_documents)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _reference(specs: list[str], config: PrepareConfig) -> Iterator[str]:
    """The n-gram reference documents, normalised as the corpus is."""
    docs = read_documents(resolve_inputs(specs), config.field, config.separator)
    return (normalize_text(doc, config.nfc) for doc in docs)


def _boilerplate_lines(files: list[Path], config: PrepareConfig) -> dict[bytes, int]:
    """Pass 1 (CCNet): {line digest: first document holding it} for lines in boilerplate_min_docs or more documents."""
    if config.boilerplate_min_docs <= 0:
        return {}
    keys = partial(_line_keys, nfc=config.nfc, min_chars=config.boilerplate_min_chars)
    with mapper(config.workers) as submit:
        chunks = bounded_map(partial(submit, keys), _chunks(_documents(files, config), CHUNK_DOCS), _ahead(config))
        docs = (doc for chunk in chunks for doc in chunk)
        return common_lines(tqdm(docs, desc="counting lines", unit="doc", disable=None), config.boilerplate_min_docs)


def _line_keys(docs: list[str], nfc: bool, min_chars: int) -> list[tuple[bytes, set[bytes]]]:
    """(exact_key, line digests) of each normalised document: what pass 1 counts."""
    normal = [normalize_text(doc, nfc) for doc in docs]
    return [(exact_key(doc), line_digests(doc, min_chars)) for doc in normal]


def _outcomes(files: list[Path], config: PrepareConfig, submit: Callable) -> Iterator[Outcome]:
    """Pass 2: each document's Outcome, in corpus order, computed by the workers."""
    positioned = enumerate(_documents(files, config))
    chunks = bounded_map(partial(submit, process_chunk), _chunks(positioned, CHUNK_DOCS), _ahead(config))
    docs = (doc for chunk in chunks for doc in chunk)
    yield from tqdm(docs, desc="preparing", unit="doc", disable=None)


def _ahead(config: PrepareConfig) -> int:
    return 2 * worker_count(config.workers)


def _count(report: dict, doc: Outcome) -> None:
    """Add one document's reading, boilerplate and filter results to the report."""
    report["documents_read"] += 1
    report["chars_read"] += doc.chars_read
    report["boilerplate"]["lines_dropped"] += doc.boilerplate.lines_dropped
    report["boilerplate"]["chars_dropped"] += doc.boilerplate.chars_dropped
    if doc.bucket is not None:
        report["perplexity"]["buckets"][doc.bucket] += 1
    if doc.issue is not None:
        report["filters"][doc.issue]["documents"] += 1
        report["filters"][doc.issue]["chars"] += doc.chars


def _check_left(report: dict) -> None:
    """DataError when there were no documents, or the filters removed every one."""
    read = report["documents_read"]
    if not read:
        raise DataError(f"the {report['files']} input files hold no documents; check the inputs (and --field for "
                        "JSON/Parquet)")
    if sum(r["documents"] for r in report["filters"].values()) < read:
        return
    culprits = ", ".join(f"{name} removed {r['documents']}" for name, r in report["filters"].items() if r["documents"])
    emptied = report["boilerplate"]["lines_dropped"]
    note = f" (after {emptied} boilerplate lines were dropped)" if emptied else ""
    raise DataError(f"no documents are left after the quality filters: of {read} read{note}, {culprits}; "
                    "relax those filters (e.g. --min-chars) or check the inputs")


# --- the worker side ----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # this process's DocumentStages and tokenizer settings (set by _set_stages)


def _set_stages(stages: DocumentStages, tokens: dict, keep_text: bool) -> None:
    _WORKER.update(stages=stages, tokens=tokens, keep_text=keep_text)


def process_chunk(chunk: list[tuple[int, str]]) -> list[Outcome]:
    """Each (position, raw text) through the per-document stages; the documents that pass are tokenised."""
    outcomes = [_WORKER["stages"].clean(position, raw) for position, raw in chunk]
    passing = [doc for doc in outcomes if doc.issue is None]
    if passing:
        for doc, ids in zip(passing, encode_documents([doc.text for doc in passing], **_WORKER["tokens"])):
            doc.ids = ids
            doc.text = doc.text if _WORKER["keep_text"] else None  # only semantic dedup reads it again
    return outcomes


# --- split, tokenise, write ---------------------------------------------------------------------------

def split_documents(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Train/val by a stable hash of each document, at least one of each; DataError for fewer than two documents."""
    if len(docs) < 2:
        raise DataError(f"only {len(docs)} document is left after cleaning, so none can be held out for validation, "
                        "which pretraining needs; add documents (a text file is one document unless --separator "
                        "cuts it)")
    scores = [_unit_hash(doc) for doc in docs]
    is_val = [score < val_fraction for score in scores]
    if not any(is_val):
        is_val[scores.index(min(scores))] = True
    elif all(is_val):
        is_val[scores.index(max(scores))] = False
    return {"train": [d for d, v in zip(docs, is_val) if not v], "val": [d for d, v in zip(docs, is_val) if v]}

def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by text alone (not by its position, the run or the machine)."""
    return unit_hash(text)


_TOKENIZERS: dict[tuple[str, str], Any] = {}  # (path, sha256) -> the tokenizer, loaded once per process


def encode_documents(texts: list[str], tokenizer_path: str, dtype: str, sha256: str = "") -> list[np.ndarray]:
    """[bos] + encode(text) + [eos] for each text: a document as a shard holds it."""
    key = (tokenizer_path, sha256)  # the sha256 tells a new tokenizer written to the same path
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(tokenizer_path)
    tokenizer = _TOKENIZERS[key]
    return [np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=shards.DTYPES[dtype]) for text in texts]


def _meta(tokenizer, identity: dict, splits: dict, report: dict, config: PrepareConfig) -> dict[str, Any]:
    """The meta.json of a finished run."""
    return {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": shards.token_dtype(tokenizer.vocab_size),
        "tokenizer": {"file": shards.TOKENIZER_FILE, "sha256": identity["tokenizer_sha256"],
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "splits": splits, "report": report, "settings": identity["settings"], "inputs": identity["inputs"],
        "model_inputs": identity["model_inputs"],
    }
