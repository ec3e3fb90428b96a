"""Argument types shared by the commands: argparse calls them on the text given."""

from __future__ import annotations

import argparse

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def byte_size(text: str) -> int:
    """'5GB', '500MiB' or a plain byte count."""
    upper = text.strip().upper()
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if upper.endswith(u)), "B")
    try:
        size = float(upper.removesuffix(unit)) * SIZE_UNITS[unit]
    except ValueError:
        size = float("nan")
    if not 0 < size < 2**60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MiB or 1000000")
    return int(size)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)
