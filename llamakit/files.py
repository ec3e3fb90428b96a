"""File-system steps every layer shares (a neutral leaf: it imports nothing from the package)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder tmp to dst; an existing dst is moved aside first (a folder cannot be renamed
    over another), so dst is at every moment either the old folder or the new one, never a mix."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


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
