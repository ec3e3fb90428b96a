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


def random_seed(text: str) -> int:
    """A random seed: an integer torch.Generator.manual_seed accepts."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (an integer from 0 to 2**64 - 1)")
    return value


def context_window(requested: int | None, trained: int, option: str, extend: bool, default: int | None = None) -> int:
    """The window a command runs with: `requested` (refused beyond the model's trained context unless extend), else
    `default` (the model's own window when None)."""
    from llamakit.generate.decode import check_context  # called once the model is loaded: torch is imported

    if requested is None:
        return default or trained
    check_context(requested, trained, f"{option} {requested}", "add --extend-context", extend)
    return requested
