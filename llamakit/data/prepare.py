"""`prepare`: raw text files -> cleaned, deduplicated, tokenised, packed shards (see shards.py).

Stages, in order: read -> normalise -> drop boilerplate lines -> quality/language filters ->
exact dedup -> near dedup -> train/val split -> tokenise (worker processes) -> shards -> meta.json.
The cleaned corpus is held in memory between stages (dedup compares every document with all
earlier ones); only the token ids are streamed to disk. Every stage keeps corpus order, so the
output is the same whatever the number of workers. The new folder is built beside the output
(`.NAME.tmp-PID`) and renamed into place when complete, so an earlier result survives until then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import multiprocessing
import os
import re
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llamakit.data import shards
from llamakit.data.clean import FILTER_NAMES, FilterConfig, LanguageFilter, normalize_text, quality_issue, remove_boilerplate
from llamakit.data.dedup import DedupConfig, Removed, remove_exact_duplicates, remove_near_duplicates
from llamakit.data.sources import input_fingerprint, read_documents, resolve_inputs
from llamakit.errors import DataError
from llamakit.files import atomic_directory, remove_stale_temporaries, write_atomic
from llamakit.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CHUNK_DOCS = 64  # documents per task sent to a worker
# What a prepared folder may hold; anything else means the output points at someone else's folder.
_OURS = re.compile(r"(meta\.json|tokenizer\.model|(train|val)-\d{5}\.bin|\..*\.tmp(-\d+)?)")
# Settings that do not change the output, so changing them does not make a prepared folder stale.
_NOT_COMPARED = ("inputs", "output", "tokenizer", "workers", "force")


@dataclasses.dataclass
class PrepareConfig:
    """What to prepare and how. Filter and dedup defaults are documented in clean.py and dedup.py."""

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
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    val_fraction: float = 0.005  # share of documents held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file
    workers: int | None = None  # processes for filtering, MinHash and tokenising (default: all CPUs)
    force: bool = False  # re-prepare an output folder that holds other data


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare config.inputs into config.output; returns the report (what each stage removed, tokens per split)."""
    _check_config(config)
    output = Path(config.output)
    files = _outside(resolve_inputs(config.inputs), output)
    tokenizer = load_tokenizer(config.tokenizer)
    identity = {"settings": settings_of(config), "inputs": input_fingerprint(files),
                "tokenizer_sha256": shards.file_sha256(tokenizer.path)}
    existing = _prepared_meta(output)
    if existing is not None and not config.force:  # decided from meta.json and a listing: nothing is read
        _check_same(output, existing, identity)
        _check_intact(output, existing)
        logger.info("%s is already prepared with these inputs and settings; nothing to do", output)
        return existing["report"]
    _check_output(output)
    with _mapper(config.workers) as map_fn:
        docs, report = clean_corpus(files, config, map_fn)
        splits = split_documents(docs, config.val_fraction)
        with _building(output) as folder:
            meta_splits = _write_splits(folder, splits, tokenizer, config.shard_tokens, map_fn)
            report["splits"] = {name: {k: v for k, v in s.items() if k != "shards"} for name, s in meta_splits.items()}
            shards.write_meta(folder, _meta(tokenizer, identity, meta_splits, report, config))
    logger.info("prepared %s: %s", output, report["splits"])
    return report


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
    settings["filters"]["languages"] = list(config.filters.languages)
    return {key: str(value) if isinstance(value, Path) else value for key, value in settings.items()}


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


def clean_corpus(files: list[Path], config: PrepareConfig, map_fn: Callable = map) -> tuple[list[str], dict]:
    """The documents of files after normalisation, boilerplate removal, filters and dedup, and the report."""
    docs, report = _read(files, config)
    docs, stats = remove_boilerplate(docs, config.boilerplate_min_docs, config.boilerplate_min_chars)
    report["boilerplate"] = dataclasses.asdict(stats)
    docs, report["filters"] = _filter(docs, config.filters, map_fn)
    _check_left(docs, report, "the quality filters")
    removed_exact, removed_near = Removed(), Removed()
    if config.dedup.exact:
        docs, removed_exact = remove_exact_duplicates(docs)
    if config.dedup.near:
        docs, removed_near = remove_near_duplicates(docs, config.dedup, partial(map_fn, chunksize=CHUNK_DOCS))
    report["exact_duplicates"] = dataclasses.asdict(removed_exact)
    report["near_duplicates"] = dataclasses.asdict(removed_near)
    report["kept"] = {"documents": len(docs), "chars": sum(map(len, docs))}
    logger.info("cleaning kept %d of %d documents", len(docs), report["documents_read"])
    return docs, report


def _read(files: list[Path], config: PrepareConfig) -> tuple[list[str], dict]:
    """Every document, normalised, and the report's first counts."""
    raw = itertools.islice(read_documents(files, config.field, config.separator), config.max_documents)
    docs, chars = [], 0
    for doc in tqdm(raw, desc="reading", unit="doc", disable=None):
        chars += len(doc)
        docs.append(normalize_text(doc, config.nfc))
    if not docs:
        raise DataError(f"the {len(files)} input files hold no documents; check the inputs (and --field for "
                        "JSON/Parquet)")
    return docs, {"files": len(files), "documents_read": len(docs), "chars_read": chars}


def _filter(docs: list[str], config: FilterConfig, map_fn: Callable) -> tuple[list[str], dict]:
    """docs that pass every quality (and language) filter, and what each filter removed."""
    removed = {name: Removed() for name in FILTER_NAMES}
    kept = []
    for doc, issue in zip(docs, map_fn(partial(document_issue, config=config), docs, chunksize=CHUNK_DOCS)):
        if issue is None:
            kept.append(doc)
        else:
            removed[issue].add(doc)
    return kept, {name: dataclasses.asdict(r) for name, r in removed.items()}


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


def _check_left(docs: list[str], report: dict, stage: str) -> None:
    """DataError naming the filters that removed everything, when nothing is left."""
    if docs:
        return
    culprits = ", ".join(f"{name} removed {r['documents']}" for name, r in report["filters"].items() if r["documents"])
    emptied = report["boilerplate"]["lines_dropped"]
    note = f" (after {emptied} boilerplate lines were dropped)" if emptied else ""
    raise DataError(f"no documents are left after {stage}: of {report['documents_read']} read{note}, {culprits}; "
                    "relax those filters (e.g. --min-chars) or check the inputs")


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
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _write_splits(output: Path, splits: dict[str, list[str]], tokenizer, shard_tokens: int,
                  map_fn: Callable) -> dict[str, dict]:
    """Tokenise each split into shards; the meta.json entry of each split."""
    write_atomic(output / shards.TOKENIZER_FILE, tokenizer.path.read_bytes())
    dtype = shards.token_dtype(tokenizer.vocab_size)
    entries = {}
    for name, docs in splits.items():
        with shards.ShardWriter(output, name, dtype, shard_tokens) as writer:
            tokens = 0
            for ids in _tokenize(docs, output / shards.TOKENIZER_FILE, dtype, name, map_fn):
                writer.write(ids)
                tokens += ids.size
            entries[name] = {"tokens": tokens, "documents": len(docs), "shards": writer.close()}
    return entries


def _tokenize(docs: list[str], tokenizer_path: Path, dtype: str, split: str, map_fn: Callable) -> Iterator[np.ndarray]:
    """The packed ids of docs, a chunk at a time, in order, with a progress bar."""
    chunks = [docs[i:i + CHUNK_DOCS] for i in range(0, len(docs), CHUNK_DOCS)]
    encode = partial(encode_documents, tokenizer_path=str(tokenizer_path), dtype=dtype,
                     sha256=shards.file_sha256(tokenizer_path))
    with tqdm(total=len(docs), desc=f"tokenizing {split}", unit="doc", disable=None) as bar:
        for chunk, ids in zip(chunks, map_fn(encode, chunks)):
            bar.update(len(chunk))
            yield ids


_TOKENIZERS: dict[tuple[str, str], Any] = {}  # (path, sha256) -> the tokenizer, loaded once per process


def encode_documents(texts: list[str], tokenizer_path: str, dtype: str, sha256: str = "") -> np.ndarray:
    """[bos] + encode(text) + [eos] for each text, concatenated: the packed layout of a shard."""
    key = (tokenizer_path, sha256)  # the sha256 tells a new tokenizer written to the same path
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(tokenizer_path)
    tokenizer = _TOKENIZERS[key]
    ids = [np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=shards.DTYPES[dtype]) for text in texts]
    return np.concatenate(ids) if ids else np.empty(0, dtype=shards.DTYPES[dtype])


@contextlib.contextmanager
def _mapper(workers: int | None) -> Iterator[Callable]:
    """An order-preserving map: builtin map for one worker, else a process pool's imap."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield lambda fn, items, chunksize=1: map(fn, items)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_ignore_sigint) as pool:  # leaving the block terminates the workers
        yield pool.imap


def _ignore_sigint() -> None:
    """In a worker: Ctrl-C reaches the whole process group, and only the parent should handle it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _meta(tokenizer, identity: dict, splits: dict, report: dict, config: PrepareConfig) -> dict[str, Any]:
    """The meta.json of a finished run."""
    return {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": shards.token_dtype(tokenizer.vocab_size),
        "tokenizer": {"file": shards.TOKENIZER_FILE, "sha256": identity["tokenizer_sha256"],
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "splits": splits, "report": report, "settings": identity["settings"], "inputs": identity["inputs"],
    }
