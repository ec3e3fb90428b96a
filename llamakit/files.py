"""File-system steps every layer shares (a neutral leaf: it imports nothing from the package)."""

from __future__ import annotations

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
