"""File-system steps every layer shares (a neutral leaf: it imports nothing from the package): atomic writes of
files and folders (temp sibling + rename), and telling a full disk from other write errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
TEMPORARY = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")  # what atomic_file/atomic_directory leave if killed outright


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder tmp to dst; an existing dst is moved aside first (a folder cannot be renamed
    over another), so dst is at every moment either the old folder or the new one, never a mix."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def remove_stale_temporaries(folder: Path, name: str | None = None) -> None:
    """Delete the temporaries (`.NAME.tmp-PID`, `.NAME.old-PID`; only NAME's when given) that a process killed
    outright (SIGKILL) left in folder."""
    for path in folder.iterdir() if folder.is_dir() else ():
        match = TEMPORARY.fullmatch(path.name)
        if match and name in (None, match[1]) and left_by_dead_process(int(match[3])):
            log.info("removing %s, left by a process that was killed", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def left_by_dead_process(pid: int) -> bool:
    """Whether something marked with `pid` (a temporary, a lock) was left by a process that is gone: no process has
    that id now, or this one does (the id was reused; what this process writes is not there yet when it starts)."""
    return pid == os.getpid() or not _process_running(pid)


def _process_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (assumed so where that cannot be probed)."""
    if os.name == "nt":  # os.kill would end the process there, not probe it
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        pass
    return True


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether a failed write into folder `where` ran out of disk space or quota (writers report it each in
    their own way)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    if any(sign in text for sign in ("No space left", "Disk quota exceeded", "os error 28", "os error 122")):
        return True  # safetensors: "I/O error: No space left on device (os error 28)"
    # torch.save and numpy's tofile report only a short write ("[enforce fail at inline_container.cc] ...
    # unexpected pos", "12422 requested and 11266 written"); the file system tells whether space ran out.
    short_write = "inline_container.cc" in text or ("requested and" in text and "written" in text)
    with contextlib.suppress(OSError):
        return short_write and shutil.disk_usage(where).free < 2**20
    return False


@contextlib.contextmanager
def atomic_file(dst: Path, *, full: Callable[[], BaseException] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path for the caller to write; once the block finishes it is flushed to disk and
    renamed over dst, so dst is never half-written. On an error the temporary is removed; when the disk ran
    out of space, full() is raised instead of the writer's own error."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        _clean_up(e, tmp.parent, full, lambda: tmp.unlink(missing_ok=True))
        raise


@contextlib.contextmanager
def atomic_directory(dst: Path, *, full: Callable[[], BaseException] | None = None,
                     unwritable: Callable[[OSError], BaseException] | None = None) -> Iterator[Path]:
    """Yield a new temporary sibling folder that replaces dst (_move_into_place) once the block finishes, every
    file in it flushed to disk. On an error it is removed; full() is raised when the disk ran out of space, and
    unwritable(error) when the folder cannot be made."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier run that had this process id
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        if unwritable is None:
            raise
        raise unwritable(e) from None
    try:
        yield tmp
        _finish_tree(tmp)
        _move_into_place(tmp, dst)
    except BaseException as e:
        _clean_up(e, tmp, full, lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path through a temporary sibling (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _clean_up(error: BaseException, where: Path, full: Callable[[], BaseException] | None,
              remove: Callable[[], None]) -> None:
    """Remove a failed write's temporary; raise full() when the disk ran out (judged before removing it)."""
    out_of_space = full is not None and disk_full(error, where)
    remove()
    if out_of_space:
        raise full() from None


def _finish_tree(folder: Path) -> None:
    """Flush every file to disk and give it the usual permissions (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
