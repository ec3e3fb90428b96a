"""A run owns its folder: `.lock` holds the owner's pid and host, so a second run into the same folder fails at
once instead of mixing its records into the first's; a lock left by a killed run is taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

import torch.distributed as dist

from llamakit.errors import ConfigError
from llamakit.files import left_by_dead_process, remove_stale_temporaries
from llamakit.train.parallel import Processes

log = logging.getLogger(__name__)
LOCK = ".lock"  # {"pid", "host"} of the run that owns the folder


@contextlib.contextmanager
def own_run_folder(out_dir: Path, procs: Processes):
    """Hold out_dir/.lock for the run: rank 0 takes it (and clears what killed runs left), every process
    fails alike when another run holds it. A lock whose process is gone (same host) is taken over."""
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # removed again if left empty
    lock = error = None
    if procs.is_main:
        try:
            lock = _take_lock(out_dir)
        except Exception as e:  # every process must hear of it, or the others would wait forever
            error = e
    try:
        message = _from_main(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise ConfigError(message)
        if lock is not None:
            remove_stale_temporaries(out_dir)  # saves a killed run never finished
        yield
    finally:
        if lock is not None:
            _release_lock(out_dir / LOCK, lock)
        if procs.is_main:
            _remove_empty(made)


def _take_lock(out_dir: Path) -> dict:
    """Create out_dir/.lock atomically with this process's pid and host, or fail naming the run that holds it."""
    path, me = out_dir / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create the run folder ({e.strerror}); set checkpoint.out_dir to a "
                          "writable folder") from None
    for _ in range(3):  # a stale lock is removed, then the create is tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            if not _stale(owner, me["host"]):
                held = f"pid {owner['pid']} on {owner['host']}" if owner else "an unreadable lock"
                raise ConfigError(f"{out_dir} is in use by another run ({held}); wait for it to end or set "
                                  f"checkpoint.out_dir to another folder (if no run uses it, delete {path})") from None
            log.warning("%s: taking over the lock of pid %d on %s, which is no longer running", out_dir,
                        owner["pid"], owner["host"])
            if _read_lock(path) == owner:  # not replaced meanwhile by a run that took it over first
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me
    raise ConfigError(f"{out_dir}: cannot take the lock {path}; other runs keep replacing it")


def _read_lock(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _stale(owner: dict | None, host: str) -> bool:
    """The lock's process is gone: same host, and its pid is ours (reused) or not running."""
    if owner is None or owner["host"] != host:
        return False
    return left_by_dead_process(owner["pid"])


def _release_lock(path: Path, me: dict) -> None:
    if _read_lock(path) == me:
        path.unlink(missing_ok=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created (deepest first) if it wrote nothing into them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _from_main(value: str | None) -> str | None:
    """Rank 0's value, on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
