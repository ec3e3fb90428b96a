"""`llamakit download`, `convert`, `quantize` and `info`: fetch, convert, quantize and describe checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llamakit.cli.argtypes import byte_size, positive_int
from llamakit.errors import LlamakitError


def download(args: argparse.Namespace) -> None:
    """Download Llama weights from the Hugging Face Hub (needs network; gated repos need --token)."""
    from llamakit.checkpoint.download import download as fetch

    dest = args.dest or Path("checkpoints") / args.repo_id
    folder = fetch(args.repo_id, dest, token=args.token, revision=args.revision, meta=args.meta)
    print(f"downloaded {args.repo_id} to {folder}; run it with: llamakit generate --checkpoint {folder} \"Hello\"")


def convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint between formats (the source format is detected)."""
    from llamakit.checkpoint import find_tokenizer, load_model, save_model
    from llamakit.checkpoint.io import check_separate

    if args.shards is not None and args.to != "meta":
        raise LlamakitError("--shards applies to --to meta only (Hugging Face files are split by --max-shard-size)")
    if args.type is not None and args.to != "gguf":
        raise LlamakitError("--type applies to --to gguf only (other formats take --dtype)")
    if args.dtype is not None and args.to == "gguf":
        raise LlamakitError("--dtype does not apply to --to gguf; choose the GGUF tensor type with --type")
    check_separate(args.src, args.dst)
    tokenizer = args.tokenizer or find_tokenizer(args.src)
    if args.to == "llama2c":
        tokenizer = None  # a llama2.c file has no place for one
    model = load_model(args.src, dtype=args.dtype)
    save_model(model, args.dst, args.to, tokenizer=tokenizer, shards=args.shards or 1, dtype=args.dtype,
               max_shard_bytes=args.max_shard_size, overwrite=args.force, gguf_type=args.type)
    note = "" if tokenizer else " without a tokenizer (none found beside the source, or the format holds none)"
    print(f"wrote {args.to} checkpoint to {args.dst}{note}")


def quantize(args: argparse.Namespace) -> None:
    """Quantize a checkpoint's linear layers to int8 or int4 into a llamakit folder that loads quantized."""
    from llamakit.checkpoint import find_tokenizer, load_model, save_model
    from llamakit.checkpoint.io import check_separate
    from llamakit.model.quantize import quantization
    from llamakit.model.transforms import applied

    if args.group_size is not None and args.to != "int4":
        raise LlamakitError("--group-size applies to --to int4 only")
    transforms = quantization(args.to, args.group_size)
    check_separate(args.src, args.dst)
    tokenizer = args.tokenizer or find_tokenizer(args.src)
    model = load_model(args.src, dtype=args.dtype, transforms=transforms)  # quantized one matrix at a time
    if len(applied(model)) > len(transforms):
        raise LlamakitError(f"{args.src} is already transformed ({', '.join(t.name for t in applied(model))}); "
                            "quantize the original weights instead")
    save_model(model, args.dst, tokenizer=tokenizer, overwrite=args.force)
    size = sum(f.stat().st_size for f in Path(args.dst).glob("*.safetensors"))
    kind = args.to + (f" (groups of {transforms[0].group_size})" if args.to == "int4" else "")
    print(f"wrote an {kind} checkpoint to {args.dst} ({size / 2**20:.1f} MiB of weights)")


def info(args: argparse.Namespace) -> None:
    """Show a preset's or a checkpoint's configuration, parameter count and memory needs."""
    from llamakit.checkpoint import detect_format, find_tokenizer, load_config
    from llamakit.model import PRESETS, ModelConfig, describe
    from llamakit.model.config import format_fact

    if not Path(args.target).exists() and args.target.lower() not in PRESETS:
        raise LlamakitError(f"{args.target}: no such checkpoint path, and not a preset ({', '.join(PRESETS)})")
    if Path(args.target).exists():
        config = load_config(args.target)
        try:
            tokenizer = find_tokenizer(args.target)
        except LlamakitError as e:  # a GGUF whose vocabulary llamakit cannot rebuild: describe the model anyway
            tokenizer = f"none usable ({e})"
        source = {"path": str(args.target), "format": detect_format(args.target),
                  "tokenizer": str(tokenizer) if tokenizer else None}
    else:
        config, source = ModelConfig.from_preset(args.target), {"preset": args.target.lower()}
    facts = describe(config)
    if args.json:  # JSON values: numbers, booleans, null; sizes in bytes
        print(json.dumps({**source, **facts}, indent=2))
        return
    table = {**{k: v or "none found" for k, v in source.items()}, **{k: format_fact(k, v) for k, v in facts.items()}}
    width = max(map(len, table))
    for key, value in table.items():
        print(f"{key:<{width}}  {value}")


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="Hugging Face repository, e.g. meta-llama/Llama-3.2-1B")
    p.add_argument("--dest", type=Path, help="output folder (default: checkpoints/REPO_ID); reruns resume")
    p.add_argument("--token", help="Hugging Face access token for gated models (default: HF_TOKEN or login)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--meta", action="store_true", help="fetch Meta's original .pth files instead of safetensors")


def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read: a Hugging Face/llamakit/Meta folder, a llama2.c .bin or a .gguf file")
    p.add_argument("dst", help="output folder (a file for --to llama2c and gguf); must not exist unless --force")
    p.add_argument("--to", required=True, choices=["hf", "meta", "llamakit", "llama2c", "gguf"],
                   help="output format (gguf: for llama.cpp, Ollama, LM Studio; tokenizer and chat template inside)")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="GGUF tensor type (default: the weights' float type); norms stay f32, q4_0 keeps the output "
                        "head q8_0, rows not a multiple of 32 fall back to f16, as llama.cpp does")
    p.add_argument("--shards", type=positive_int, help="number of consolidated.NN.pth files for --to meta (default 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="convert weights (default: keep as stored)")
    p.add_argument("--tokenizer", help="tokenizer file to copy beside the weights (default: the source's)")
    p.add_argument("--max-shard-size", type=byte_size, default="5GB", help="largest safetensors file, e.g. 2GB")
    p.add_argument("--force", action="store_true", help="replace dst if it exists (atomically)")


def add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read: a Hugging Face/llamakit/Meta folder, a llama2.c .bin or a .gguf "
                   "file (a GGUF's Q4_0 matrices go straight into int4 with groups of 32)")
    p.add_argument("dst", help="output folder (llamakit format); must not exist unless --force")
    p.add_argument("--to", required=True, choices=["int8", "int4"],
                   help="int8: per output channel, symmetric; int4: groups of --group-size columns, with zero points")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="input columns sharing an int4 scale and zero point (default 32; larger: smaller, less exact)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of what stays unquantized: the embedding and norms (default: as stored)")
    p.add_argument("--tokenizer", help="tokenizer file to copy beside the weights (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace dst if it exists (atomically)")


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a preset name (e.g. llama3.1-8b) or a checkpoint path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
