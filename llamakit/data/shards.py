"""The on-disk format of prepared pretraining data: packed token-id shards plus meta.json.

A prepared folder holds
- `meta.json`: format, version, dtype, the tokenizer (file, sha256, vocab_size, bos/eos ids), the
  splits (token and document counts, shard files), the cleaning report, settings and inputs;
- `tokenizer.model`: a copy of the tokenizer used, so the folder describes itself;
- `train-00000.bin`, ..., `val-00000.bin`, ...: raw little-endian token ids (uint16 when the
  vocabulary fits, else uint32). Each document is `[bos] + encode(text) + [eos]`; documents are
  concatenated (packed), and the training loop cuts fixed-length windows across them.
meta.json is written last, so a folder without it is incomplete, whatever else it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llamakit.errors import DataError
from llamakit.files import write_atomic

FORMAT = "llamakit-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
TMP_SUFFIX = ".tmp"  # partial files are hidden (".name.tmp") until complete


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype name ("uint16" or "uint32") that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically: the step that marks a prepared folder complete."""
    write_atomic(root / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())


class ShardWriter:
    """Appends token ids to `{split}-NNNNN.bin` files of shard_tokens ids each; each appears only once complete."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.root, self.split, self.shard_tokens = Path(root), split, shard_tokens
        self.dtype = DTYPES[dtype]
        self.shards: list[dict[str, Any]] = []  # {"file", "tokens"} of each finished shard
        self._file = None
        self._in_shard = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (any integer array), starting new shards as they fill."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 (kept open across write() calls)
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            tokens[:take].tofile(self._file)
            self._in_shard += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; the list of shards written."""
        if self._file is not None and self._in_shard:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp_path().unlink(missing_ok=True)

    def _tmp_path(self) -> Path:
        return self.root / f".{shard_name(self.split, len(self.shards))}{TMP_SUFFIX}"

    def _finish_shard(self) -> None:
        """Flush the open shard to disk and rename it to its final name."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        os.replace(self._tmp_path(), self.root / name)
        self.shards.append({"file": name, "tokens": self._in_shard})
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()


def check_tokenizer_copy(root: Path, meta: dict[str, Any]) -> None:
    """DataError unless root's copy of the tokenizer is still the file meta.json records."""
    recorded = meta["tokenizer"]
    path = Path(root) / recorded["file"]
    sha = file_sha256(path) if path.is_file() else None
    if sha != recorded["sha256"]:
        state = f"has sha256 {sha[:12]}..." if sha else "is missing"
        raise DataError(f"{path} {state} but {Path(root) / META_FILE} records sha256 {recorded['sha256'][:12]}... "
                        "(the tokenizer the shards were made with); restore the original file or re-run "
                        "`llamakit prepare --force`")


def read_meta(root: Path) -> dict[str, Any]:
    """A prepared folder's meta.json, checked to be a llamakit-shards file this version reads."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"prepared data folder {root} does not exist; run `llamakit prepare` first")
    path = root / META_FILE
    if not path.is_file():
        raise DataError(f"{root} has no {META_FILE} (it was never prepared, or preparation did not finish); "
                        "run `llamakit prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); re-run `llamakit prepare --force`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} meta file; point to a folder written by `llamakit prepare`")
    if meta.get("version") != VERSION:
        raise DataError(f"{path} has format version {meta.get('version')}, but this llamakit reads version {VERSION}; "
                        "re-run `llamakit prepare --force` with this version")
    if meta.get("dtype") not in DTYPES:
        raise DataError(f"{path} has unknown dtype {meta.get('dtype')!r} (expected one of {', '.join(DTYPES)}); "
                        "re-run `llamakit prepare --force`")
    return meta


class TokenShards:
    """The token ids of one split of a prepared folder, memory-mapped, as one long read-only sequence."""

    def __init__(self, root: str | os.PathLike[str], split: str = "train"):
        self.root, self.split = Path(root), split
        self.meta = read_meta(self.root)
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.root} has no {split!r} split (it has {', '.join(splits) or 'none'})")
        self.dtype = DTYPES[self.meta["dtype"]]
        try:
            self._shards = [self._open(entry) for entry in splits[split]["shards"]]
        except (KeyError, TypeError) as err:
            raise DataError(f"{self.root / META_FILE} is malformed (bad entry {err} in split {split!r}); re-run "
                            "`llamakit prepare --force`") from None
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # first token of each shard, then the end
        if not len(self):
            hint = (" (or a --val-fraction above 0; a single text file is a single document unless --separator "
                    "cuts it)" if split == "val" else "")
            raise DataError(f"the {split!r} split of {self.root} holds no tokens; re-run `llamakit prepare --force` "
                            f"with more documents{hint}")

    def _open(self, entry: dict[str, Any]) -> np.memmap:
        """One shard memory-mapped, after checking that its size matches meta.json."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; the prepared folder is incomplete, re-run "
                            "`llamakit prepare --force`")
        expected = entry["tokens"] * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes but meta.json records {entry['tokens']} "
                            f"tokens ({expected} bytes); it is truncated or damaged, re-run `llamakit prepare --force`")
        if not entry["tokens"]:
            return np.empty(0, dtype=self.dtype)  # mmap cannot map an empty file
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(entry["tokens"],))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        """The copy of the tokenizer that the shards were made with."""
        return self.root / self.meta["tokenizer"]["file"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) is outside the {len(self)} tokens of the "
                             f"{self.split!r} split")
        out = np.empty(length, dtype=np.int64)  # (length,)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, len(self._shards[shard]) - offset)
            out[done:done + take] = self._shards[shard][offset:offset + take]
            done, shard = done + take, shard + 1
        return out

    def check_tokenizer(self, tokenizer) -> None:
        """DataError unless tokenizer is the one the shards were made with (same file bytes and vocab size)."""
        recorded = self.meta["tokenizer"]
        if Path(tokenizer.path).resolve() == self.tokenizer_path.resolve():
            check_tokenizer_copy(self.root, self.meta)  # the folder's own copy: it was replaced, not mismatched
        elif (sha := file_sha256(Path(tokenizer.path))) != recorded["sha256"]:
            raise DataError(f"the shards in {self.root} were prepared with tokenizer {recorded['file']} (sha256 "
                            f"{recorded['sha256'][:12]}...) but {tokenizer.path} has sha256 {sha[:12]}...; pass that "
                            f"tokenizer ({self.tokenizer_path}) or re-run `llamakit prepare` with this one")
        if tokenizer.vocab_size != recorded["vocab_size"]:
            raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the shards in "
                            f"{self.root} were made with {recorded['vocab_size']}; pass {self.tokenizer_path}")

    def __repr__(self) -> str:
        return f"TokenShards({str(self.root)!r}, split={self.split!r}, tokens={len(self)})"
