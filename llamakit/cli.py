"""`llamakit <command>`: a table of commands. Errors a user can cause print one line and exit 1."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llamakit.errors import LlamakitError

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint between formats (the source format is detected)."""
    from llamakit.checkpoint import find_tokenizer, load_model, save_model

    if args.shards is not None and args.to != "meta":
        raise LlamakitError("--shards applies to --to meta only (Hugging Face files are split by --max-shard-size)")
    tokenizer = args.tokenizer or find_tokenizer(args.src)
    if args.to == "llama2c":
        tokenizer = None  # a llama2.c file has no place for one
    model = load_model(args.src, dtype=args.dtype)
    save_model(model, args.dst, args.to, tokenizer=tokenizer, shards=args.shards or 1, dtype=args.dtype,
               max_shard_bytes=args.max_shard_size, overwrite=args.force)
    note = "" if tokenizer else " without a tokenizer (none found beside the source, or the format holds none)"
    print(f"wrote {args.to} checkpoint to {args.dst}{note}")


def info(args: argparse.Namespace) -> None:
    """Show a preset's or a checkpoint's configuration, parameter count and memory needs."""
    from llamakit.checkpoint import detect_format, find_tokenizer, load_config
    from llamakit.model import PRESETS, ModelConfig, describe

    if not Path(args.target).exists() and args.target.lower() not in PRESETS:
        raise LlamakitError(f"{args.target}: no such checkpoint path, and not a preset ({', '.join(PRESETS)})")
    if Path(args.target).exists():
        config = load_config(args.target)
        source = {"path": str(args.target), "format": detect_format(args.target),
                  "tokenizer": str(find_tokenizer(args.target) or "none found")}
    else:
        config, source = ModelConfig.from_preset(args.target), {"preset": args.target.lower()}
    facts = {**source, **describe(config)}
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")


def _size(text: str) -> int:
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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read: a Hugging Face/llamakit/Meta folder or a llama2.c .bin file")
    p.add_argument("dst", help="output folder (or .bin file for --to llama2c); must not exist unless --force")
    p.add_argument("--to", required=True, choices=["hf", "meta", "llamakit", "llama2c"], help="output format")
    p.add_argument("--shards", type=_positive_int, help="number of consolidated.NN.pth files for --to meta (default 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="convert weights (default: keep as stored)")
    p.add_argument("--tokenizer", help="tokenizer file to copy beside the weights (default: the source's)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace dst if it exists (atomically)")


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a preset name (e.g. llama3.1-8b) or a checkpoint path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


COMMANDS = {  # name: (add arguments, run)
    "convert": (_add_convert, convert),
    "info": (_add_info, info),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamakit", description="The LLaMA family end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=run.__doc__, description=run.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        COMMANDS[args.command][1](args)
    except LlamakitError as e:
        print(f"llamakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llamakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
