"""`llamakit <command>`: a table of commands. Errors a user can cause print one line and exit 1."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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


def prepare(args: argparse.Namespace) -> None:
    """Clean, deduplicate, tokenize and pack text files into token shards for pretraining."""
    from llamakit.data import PrepareConfig
    from llamakit.data import prepare as run

    meta = args.output / "meta.json"
    before = meta.stat().st_mtime_ns if meta.exists() else None
    report = run(PrepareConfig(
        inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, field=args.field, separator=args.separator,
        max_documents=args.max_documents, nfc=not args.no_nfc, boilerplate_min_docs=args.boilerplate_min_docs,
        boilerplate_min_chars=args.boilerplate_min_chars, filters=_filter_config(args), dedup=_dedup_config(args),
        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers, force=args.force))
    _print_report(report)
    done = "already prepared with these inputs and settings" if before == meta.stat().st_mtime_ns else "prepared"
    print(f"\n{done}: {args.output}")


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain a Llama on prepared shards with the LLaMA recipe, from a YAML config; --resume continues exactly."""
    from llamakit.train import parse_config
    from llamakit.train import pretrain as run

    overrides = [a for a in args.overrides if a != "--resume"]
    cfg = parse_config(args.config, overrides)
    logging.getLogger("llamakit").setLevel(logging.INFO)
    final = run(cfg, resume=args.resume or len(overrides) < len(args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(cfg.checkpoint.out_dir)
        print(f"final model: {final}\nmetrics: {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'}, "
              f"curve: {out / 'loss.png'})\ntry: llamakit generate --checkpoint {final} \"Once upon a time\"")


def _filter_config(args: argparse.Namespace):
    from llamakit.data import FilterConfig

    names = [f.name for f in dataclasses.fields(FilterConfig) if f.name not in ("languages", "ngram_min_words")]
    languages = tuple(code.strip() for code in (args.languages or "").split(",") if code.strip())
    return FilterConfig(**{name: getattr(args, name) for name in names}, languages=languages)


def _dedup_config(args: argparse.Namespace):
    from llamakit.data import DedupConfig

    return DedupConfig(exact=not args.no_exact_dedup, near=not args.no_near_dedup, threshold=args.dedup_threshold,
                       ngram=args.shingle_size, unit=args.shingle_unit)


def _print_report(report: dict) -> None:
    """What each stage removed and what is left, as a table."""
    rows = [(f"read ({report['files']} files)", report["documents_read"], report["chars_read"])]
    rows.append((f"boilerplate lines ({report['boilerplate']['lines_dropped']} dropped)", None,
                 -report["boilerplate"]["chars_dropped"]))
    rows += [(f"filter {name}", -r["documents"], -r["chars"]) for name, r in report["filters"].items() if r["documents"]]
    for stage in ("exact_duplicates", "near_duplicates"):
        rows.append((stage.replace("_", " "), -report[stage]["documents"], -report[stage]["chars"]))
    rows.append(("kept", report["kept"]["documents"], report["kept"]["chars"]))
    _print_table(("stage", "documents", "chars"), rows)
    print()
    _print_table(("split", "documents", "tokens"),
                 [(name, s["documents"], s["tokens"]) for name, s in report["splits"].items()])


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [header] + [(row[0], *("" if v is None else f"{v:,}" for v in row[1:])) for row in rows]
    width = max(len(c[0]) for c in cells)
    for cell in cells:
        print(f"{cell[0]:<{width}}" + "".join(f"  {value:>12}" for value in cell[1:]))


def tokenizer_tools(args: argparse.Namespace) -> None:
    """Tokenizer tools: `train` learns a LLaMA-style BPE vocabulary from text files."""
    TOKENIZER_COMMANDS[args.tokenizer_command][1](args)


def tokenizer_train(args: argparse.Namespace) -> None:
    """Train a SentencePiece BPE tokenizer the way LLaMA's was trained (split digits, byte fallback)."""
    import itertools

    from llamakit.data import normalize_text, read_documents, resolve_inputs
    from llamakit.tokenizer import load_tokenizer
    from llamakit.tokenizer.train import train_tokenizer

    docs = read_documents(resolve_inputs(args.inputs), args.field, args.separator)
    texts = (normalize_text(doc) for doc in itertools.islice(docs, args.max_documents))  # as prepare will see them
    path = train_tokenizer(texts, args.output, args.vocab_size, special_tokens=args.special_token,
                           character_coverage=args.character_coverage, num_threads=args.workers, overwrite=args.force)
    print(f"wrote a {load_tokenizer(path).vocab_size}-token tokenizer to {path}; use it with: llamakit prepare INPUT... "
          f"--tokenizer {path} --output DIR")


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


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text/.jsonl/.json/.parquet files, folders (searched "
                   "recursively) or quoted glob patterns such as 'data/**/*.jsonl'")
    p.add_argument("--field", default="text", help="JSON field or Parquet column holding the text (default text)")
    p.add_argument("--separator", help="cut text files into documents at this string, e.g. '<|endoftext|>' "
                   "(default: one document per file)")
    p.add_argument("--max-documents", type=_positive_int, help="read at most this many documents (for a trial run)")


def _add_prepare(p: argparse.ArgumentParser) -> None:
    from llamakit.data import DedupConfig, FilterConfig, PrepareConfig

    config = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    filters, dedup = FilterConfig(), DedupConfig()
    _add_input_options(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer file (or a checkpoint folder holding tokenizer.model)")
    p.add_argument("--output", type=Path, required=True, help="folder for the shards and meta.json")
    p.add_argument("--val-fraction", type=float, default=config["val_fraction"],
                   help=f"share of documents held out for validation (default {config['val_fraction']})")
    p.add_argument("--workers", type=_positive_int, help="processes for filtering and tokenizing (default: all CPUs)")
    p.add_argument("--shard-tokens", type=_positive_int, default=config["shard_tokens"],
                   help=f"tokens per shard file (default {config['shard_tokens']:,})")
    p.add_argument("--force", action="store_true", help="prepare again even if OUTPUT holds data made differently")
    p.add_argument("--no-nfc", action="store_true", help="skip Unicode NFC normalisation")
    p.add_argument("--boilerplate-min-docs", type=int, default=config["boilerplate_min_docs"], metavar="K",
                   help=f"drop lines repeated in K or more documents (default {config['boilerplate_min_docs']}; 0 keeps "
                   "them; raise it for source code, where shared lines are real code)")
    p.add_argument("--boilerplate-min-chars", type=int, default=config["boilerplate_min_chars"],
                   help=f"shorter lines are never boilerplate (default {config['boilerplate_min_chars']})")
    for name, kind, what, off in _FILTER_OPTIONS:
        default = getattr(filters, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default,
                       help=f"{what} (default {'off' if default is None else default}{off})")
    p.add_argument("--languages", help="keep only these languages (langid codes, e.g. en,fr; default: all)")
    p.add_argument("--min-language-score", type=float, default=filters.min_language_score,
                   help=f"least langid probability for --languages (default {filters.min_language_score})")
    p.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicate documents")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near-duplicate documents")
    p.add_argument("--dedup-threshold", type=float, default=dedup.threshold,
                   help=f"Jaccard similarity that makes a near duplicate (default {dedup.threshold})")
    p.add_argument("--shingle-size", type=_positive_int, default=dedup.ngram,
                   help=f"n-gram length compared by near dedup (default {dedup.ngram})")
    p.add_argument("--shingle-unit", choices=["word", "char"], default=dedup.unit, help="n-grams of words or characters")


_FILTER_OPTIONS = (  # FilterConfig field, type, help, how to turn it off
    ("min_chars", int, "drop documents shorter than this many characters", "; 0 disables"),
    ("max_chars", int, "drop documents longer than this many characters", ""),
    ("min_words", int, "drop documents with fewer words", ""),
    ("max_words", int, "drop documents with more words", ""),
    ("min_alnum_fraction", float, "drop documents with a smaller share of letters and digits among non-space "
     "characters", "; 0 disables"),
    ("max_duplicate_line_fraction", float, "drop documents with a larger share of characters in repeated lines",
     "; 1 disables"),
    ("max_top_ngram_fraction", float, "drop documents in which the commonest word 2/3/4-gram covers a larger share",
     "; 1 disables"),
)


def _add_tokenizer(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in TOKENIZER_COMMANDS.items():
        add_arguments(sub.add_parser(name, help=run.__doc__, description=run.__doc__))


def _add_tokenizer_train(p: argparse.ArgumentParser) -> None:
    _add_input_options(p)
    p.add_argument("--output", type=Path, required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=_positive_int, required=True, help="number of tokens (LLaMA: 32000)")
    p.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="a token kept whole, e.g. '<|endoftext|>' (repeatable)")
    p.add_argument("--character-coverage", type=float, default=0.99995,
                   help="share of characters given their own token; rarer ones fall back to bytes (default 0.99995)")
    p.add_argument("--workers", type=_positive_int, help="training threads (default: all CPUs)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


TOKENIZER_COMMANDS = {  # name: (add arguments, run)
    "train": (_add_tokenizer_train, tokenizer_train),
}


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in checkpoint.out_dir from its latest step")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override any config value, e.g. --optim.lr 1e-3 --train.max_steps 500; "
                        "`llamakit pretrain CONFIG --help` lists every key")


COMMANDS = {  # name: (add arguments, run)
    "generate": (_add_generate, generate),
    "chat": (_add_chat, chat),
    "download": (_add_download, download),
    "convert": (_add_convert, convert),
    "info": (_add_info, info),
    "prepare": (_add_prepare, prepare),
    "tokenizer": (_add_tokenizer, tokenizer_tools),
    "pretrain": (_add_pretrain, pretrain),
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
