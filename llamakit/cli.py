"""`llamakit <command>`: a table of commands. Errors a user can cause print one line and exit 1."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from llamakit.errors import LlamakitError

DEFAULT_MAX_SEQ_LEN = 4096  # the default context window for generate/chat: long enough, yet a small KV cache
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


def generate(args: argparse.Namespace) -> None:
    """Complete prompts with a model; a single prompt streams to stdout as it is generated."""
    from llamakit.generate import generate as run_batch
    from llamakit.generate import stream

    model, tokenizer, params, generator = _load_for_generation(args)
    prompts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in args.prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise LlamakitError(f"prompt {i + 1} is empty; give some text (or '-' to read it from stdin)")
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    window = _max_seq_len(args, model)
    budgets = [_budget(args.max_new_tokens, window, len(p), i) for i, p in enumerate(ids)]
    start = time.perf_counter()
    if len(ids) == 1:
        pieces = stream(model, tokenizer, ids[0], budgets[0], params, stop_strings=args.stop, generator=generator)
        completions = [_print_stream(pieces)]
    else:
        completions = run_batch(model, tokenizer, ids, budgets, params, stop_strings=args.stop, generator=generator)
        for prompt, completion in zip(prompts, completions):
            print(f"{prompt}{completion.text}\n")
    if args.stats:
        seconds, produced = time.perf_counter() - start, sum(len(c.tokens) for c in completions)
        print(f"{produced} tokens in {seconds:.2f} s ({produced / seconds:.1f} tokens/s, prefill included)",
              file=sys.stderr)


def _print_stream(pieces):
    """Print a stream of text pieces as they come; return the generator's final value (the Completion)."""
    while True:
        try:
            print(next(pieces), end="", flush=True)
        except StopIteration as done:
            print()
            return done.value


def chat(args: argparse.Namespace) -> None:
    """Talk with a chat model; /reset forgets the conversation, Ctrl-C stops a reply, Ctrl-D exits."""
    from llamakit.generate.chat import ChatSession

    model, tokenizer, params, generator = _load_for_generation(args)
    session = ChatSession(model, tokenizer, max_seq_len=_max_seq_len(args, model), max_new_tokens=args.max_new_tokens,
                          params=params, system=args.system, style=args.chat_format, generator=generator)
    print(f"chatting with {args.checkpoint} ({session.style} format). {CHAT_HELP}")
    while True:
        try:
            text = input("\n>>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            print("[conversation cleared]")
        elif command == "/help":
            print(CHAT_HELP)
        elif command:
            _chat_turn(session, text)


CHAT_HELP = "Type a message. /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def _chat_turn(session, text: str) -> None:
    """Stream one reply; a LlamakitError (e.g. a message too long) is shown without ending the chat."""
    reply = session.reply(text)
    try:
        first = next(reply, "")  # encodes the dialog and fits it into the window
        if session.dropped:
            print(f"[dropped the {session.dropped} oldest messages to fit the context window]")
        print(first, end="", flush=True)
        for piece in reply:
            print(piece, end="", flush=True)
        print()
    except KeyboardInterrupt:
        reply.close()
        print("\n[reply stopped]")
    except LlamakitError as e:
        print(f"error: {e}")


def download(args: argparse.Namespace) -> None:
    """Download Llama weights from the Hugging Face Hub (needs network; gated repos need --token)."""
    from llamakit.checkpoint.download import download as fetch

    dest = args.dest or Path("checkpoints") / args.repo_id
    folder = fetch(args.repo_id, dest, token=args.token, revision=args.revision, meta=args.meta)
    print(f"downloaded {args.repo_id} to {folder}; run it with: llamakit generate --checkpoint {folder} \"Hello\"")


def _load_for_generation(args: argparse.Namespace):
    """Model (on CUDA when present), tokenizer, sampling settings and a seeded random generator."""
    import torch

    from llamakit.checkpoint import load_checkpoint
    from llamakit.generate import SamplingParams
    from llamakit.generate.decode import prepare_for_decoding
    from llamakit.generate.meta_api import default_device, default_dtype

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty)
    device = torch.device(args.device) if args.device else default_device()
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.dtype or default_dtype(device), device)
    generator = torch.Generator(device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    return prepare_for_decoding(model), tokenizer, params, generator


def _max_seq_len(args: argparse.Namespace, model) -> int:
    return args.max_seq_len or min(model.config.max_seq_len, DEFAULT_MAX_SEQ_LEN)


def _budget(max_new_tokens: int, window: int, prompt_len: int, index: int) -> int:
    """New tokens for a prompt: max_new_tokens, cut short where the context window ends."""
    if prompt_len >= window:
        raise LlamakitError(f"prompt {index + 1} has {prompt_len} tokens, leaving no room in the {window}-token "
                            "context window; shorten it or raise --max-seq-len")
    return min(max_new_tokens, window - prompt_len)


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


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (any format) or llama2.c .bin file")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one in the checkpoint folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--max-seq-len", type=_positive_int,
                   help=f"context window for prompt + reply (default: the model's, at most {DEFAULT_MAX_SEQ_LEN})")


def _add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 disables)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 disables)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 disables)")
    p.add_argument("--seed", type=int, help="make sampling reproducible")


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue ('-' reads stdin); several run "
                   "as one batch")
    _add_model_options(p)
    _add_sampling_options(p, max_new_tokens=256)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--stats", action="store_true", help="print the time taken to stderr")


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    _add_sampling_options(p, max_new_tokens=512)
    p.add_argument("--system", help="system prompt for the whole conversation")
    p.add_argument("--chat-format", choices=["llama2", "llama3"],
                   help="dialog format (default: the model's config, else the tokenizer's)")


def _add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="Hugging Face repository, e.g. meta-llama/Llama-3.2-1B")
    p.add_argument("--dest", type=Path, help="output folder (default: checkpoints/REPO_ID); reruns resume")
    p.add_argument("--token", help="Hugging Face access token for gated models (default: HF_TOKEN or login)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--meta", action="store_true", help="fetch Meta's original .pth files instead of safetensors")


COMMANDS = {  # name: (add arguments, run)
    "generate": (_add_generate, generate),
    "chat": (_add_chat, chat),
    "download": (_add_download, download),
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
