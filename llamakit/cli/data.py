"""`llamakit prepare` and `llamakit tokenizer train`: from text files to a tokenizer and token shards."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

from llamakit.cli.argtypes import positive_int


def prepare(args: argparse.Namespace) -> None:
    """Clean, deduplicate, tokenize and pack text files into token shards for pretraining."""
    from llamakit.data import PrepareConfig
    from llamakit.data import prepare as run
    from llamakit.data.pipeline import ModelFilterConfig, SemanticConfig

    meta = args.output / "meta.json"
    before = meta.stat().st_mtime_ns if meta.exists() else None
    models = ModelFilterConfig(
        ngram_reference=args.ngram_reference or [], ngram_order=args.ngram_order, max_perplexity=args.max_perplexity,
        keep_buckets=tuple(b.strip() for b in args.keep_buckets.split(",") if b.strip()),
        quality_classifier=args.quality_classifier and str(args.quality_classifier), min_quality=args.min_quality)
    semantic = SemanticConfig(checkpoint=args.semantic_dedup and str(args.semantic_dedup),
                              threshold=args.semantic_threshold, max_tokens=args.semantic_max_tokens)
    config = PrepareConfig(
        inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, field=args.field, separator=args.separator,
        max_documents=args.max_documents, nfc=not args.no_nfc, boilerplate_min_docs=args.boilerplate_min_docs,
        boilerplate_min_chars=args.boilerplate_min_chars, filters=_filter_config(args), models=models,
        dedup=_dedup_config(args), semantic=semantic, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
        workers=args.workers, force=args.force)
    report = run(config, embedder=lambda: _embedder(args, semantic.max_tokens))  # loaded only if the run needs it
    _print_report(report)
    done = "already prepared with these inputs and settings" if before == meta.stat().st_mtime_ns else "prepared"
    print(f"\n{done}: {args.output}")


def _embedder(args: argparse.Namespace, max_tokens: int):
    """The semantic-dedup Embedder over --semantic-dedup's checkpoint (on CUDA when present), or None."""
    if args.semantic_dedup is None:
        return None
    from llamakit.checkpoint import load_checkpoint
    from llamakit.data.semantic import Embedder
    from llamakit.runtime import default_dtype, resolve_device

    device = resolve_device(args.device, "--device")
    model, tokenizer = load_checkpoint(args.semantic_dedup, args.semantic_tokenizer, default_dtype(device), device)
    return Embedder(model, tokenizer, max_tokens)


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
    for stage in ("exact_duplicates", "near_duplicates", "semantic_duplicates"):
        if stage in report and (stage != "semantic_duplicates" or report[stage]["documents"]):
            rows.append((stage.replace("_", " "), -report[stage]["documents"], -report[stage]["chars"]))
    rows.append(("kept", report["kept"]["documents"], report["kept"]["chars"]))
    _print_table(("stage", "documents", "chars"), rows)
    print()
    _print_table(("split", "documents", "tokens"),
                 [(name, s["documents"], s["tokens"]) for name, s in report["splits"].items()])
    if "perplexity" in report:
        low, high = report["perplexity"]["cutoffs"]
        counts = ", ".join(f"{name} {n:,}" for name, n in report["perplexity"]["buckets"].items())
        print(f"\nperplexity buckets (head <= {low:.1f} < middle <= {high:.1f} < tail): {counts}")


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


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text/.jsonl/.json/.parquet files, folders (searched "
                   "recursively) or quoted glob patterns such as 'data/**/*.jsonl'")
    p.add_argument("--field", default="text", help="JSON field or Parquet column holding the text (default text)")
    p.add_argument("--separator", help="cut text files into documents at this string, e.g. '<|endoftext|>' "
                   "(default: one document per file)")
    p.add_argument("--max-documents", type=positive_int, help="read at most this many documents (for a trial run)")


def add_prepare(p: argparse.ArgumentParser) -> None:
    from llamakit.data import DedupConfig, FilterConfig, PrepareConfig

    config = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    filters, dedup = FilterConfig(), DedupConfig()
    _add_input_options(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer file (or a checkpoint folder holding tokenizer.model)")
    p.add_argument("--output", type=Path, required=True, help="folder for the shards and meta.json")
    p.add_argument("--val-fraction", type=float, default=config["val_fraction"],
                   help=f"share of documents held out for validation, above 0: pretraining measures validation loss "
                   f"(default {config['val_fraction']})")
    p.add_argument("--workers", type=positive_int, help="processes for filtering and tokenizing (default: all CPUs)")
    p.add_argument("--shard-tokens", type=positive_int, default=config["shard_tokens"],
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
    p.add_argument("--shingle-size", type=positive_int, default=dedup.ngram,
                   help=f"n-gram length compared by near dedup (default {dedup.ngram})")
    p.add_argument("--shingle-unit", choices=["word", "char"], default=dedup.unit, help="n-grams of words or characters")
    _add_model_filter_options(p)


def _add_model_filter_options(p: argparse.ArgumentParser) -> None:
    from llamakit.data.pipeline import ModelFilterConfig, SemanticConfig

    models, semantic = ModelFilterConfig(), SemanticConfig()
    p.add_argument("--ngram-reference", nargs="+", metavar="FILE", help="reference text (e.g. Wikipedia) for CCNet's "
                   "n-gram perplexity filter: a Kneser-Ney model is trained on it and each document scored")
    p.add_argument("--ngram-order", type=positive_int, default=models.ngram_order,
                   help=f"n-gram order of that model (default {models.ngram_order})")
    p.add_argument("--max-perplexity", type=float, help="drop documents above this perplexity (default off)")
    p.add_argument("--keep-buckets", default=",".join(models.keep_buckets), help="keep documents in these CCNet buckets "
                   "(head: perplexity in the best third of held-out reference documents, middle, tail; default all)")
    p.add_argument("--quality-classifier", type=Path, metavar="FILE",
                   help="a classifier from `llamakit prepare-classifier`: drop documents it scores below --min-quality")
    p.add_argument("--min-quality", type=float, default=models.min_quality,
                   help=f"least classifier probability kept (default {models.min_quality})")
    p.add_argument("--semantic-dedup", type=Path, metavar="CHECKPOINT", help="drop documents whose embedding by "
                   "this Llama checkpoint (mean of final hidden states) is close to an earlier kept one")
    p.add_argument("--semantic-tokenizer", type=Path, help="the --semantic-dedup checkpoint's tokenizer (default: the "
                   "one beside it)")
    p.add_argument("--semantic-threshold", type=float, default=semantic.threshold,
                   help=f"cosine similarity that makes a semantic duplicate (default {semantic.threshold})")
    p.add_argument("--semantic-max-tokens", type=positive_int, default=semantic.max_tokens,
                   help=f"tokens of each document embedded (default {semantic.max_tokens})")
    p.add_argument("--device", help="device for the --semantic-dedup model (default: CUDA when present)")


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


def add_tokenizer(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in TOKENIZER_COMMANDS.items():
        add_arguments(sub.add_parser(name, help=run.__doc__, description=run.__doc__))


def _add_tokenizer_train(p: argparse.ArgumentParser) -> None:
    _add_input_options(p)
    p.add_argument("--output", type=Path, required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=positive_int, required=True, help="number of tokens (LLaMA: 32000)")
    p.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="a token kept whole, e.g. '<|endoftext|>' (repeatable)")
    p.add_argument("--character-coverage", type=float, default=0.99995,
                   help="share of characters given their own token; rarer ones fall back to bytes (default 0.99995)")
    p.add_argument("--workers", type=positive_int, help="training threads (default: all CPUs)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def prepare_classifier(args: argparse.Namespace) -> None:
    """Train a linear quality classifier (hashed word n-grams) on positive/negative documents, or on Llama labels."""
    from llamakit.data import normalize_text, read_documents, resolve_inputs
    from llamakit.data.quality import evaluate_split, train_classifier

    _check_classifier_args(args)
    def read(specs):
        docs = read_documents(resolve_inputs(specs), args.field, args.separator)
        return [normalize_text(doc) for doc in itertools.islice(docs, args.max_documents)]

    if args.label_with is not None:
        positive, negative = _llama_labels(args, read(args.documents))
    else:
        positive, negative = read(args.positive), read(args.negative)
    train_pos, held_pos = evaluate_split(positive)
    train_neg, held_neg = evaluate_split(negative)
    classifier = train_classifier(train_pos, train_neg, buckets=args.buckets, l2=args.l2)
    classifier.save(args.output)
    right = sum(classifier.score(t) >= 0.5 for t in held_pos) + sum(classifier.score(t) < 0.5 for t in held_neg)
    held = len(held_pos) + len(held_neg)
    accuracy = f"{right / held:.1%} of {held} held-out documents" if held else "no held-out documents"
    print(f"trained on {len(train_pos)} positive and {len(train_neg)} negative documents; accuracy {accuracy}")
    print(f"wrote {args.output}; use it with: llamakit prepare ... --quality-classifier {args.output} --min-quality 0.5")


def _llama_labels(args: argparse.Namespace, docs: list[str]) -> tuple[list[str], list[str]]:
    """docs split by a Llama model's answer to --label-prompt (Llama 3's recipe)."""
    from llamakit.checkpoint import load_checkpoint
    from llamakit.data.quality import label_documents
    from llamakit.errors import DataError
    from llamakit.runtime import default_dtype, resolve_device

    device = resolve_device(args.device, "--device")
    model, tokenizer = load_checkpoint(args.label_with, args.tokenizer, dtype=default_dtype(device), device=device)
    scores = label_documents(model, tokenizer, docs, args.label_prompt, batch_size=args.batch_size)
    positive = [d for d, s in zip(docs, scores) if s > args.label_threshold]
    negative = [d for d, s in zip(docs, scores) if s <= args.label_threshold]
    print(f"{args.label_with} labelled {len(positive)} of {len(docs)} documents high quality")
    if not positive or not negative:
        raise DataError(f"the model labelled all {len(docs)} documents {'high' if positive else 'low'} quality; change "
                        "--label-prompt or --label-threshold (log p(Yes) - log p(No)), or add varied documents")
    return positive, negative


def add_prepare_classifier(p: argparse.ArgumentParser) -> None:
    from llamakit.data.quality import DEFAULT_BUCKETS, LABEL_PROMPT

    p.add_argument("--positive", nargs="+", metavar="INPUT", help="high-quality documents (e.g. pages Wikipedia cites)")
    p.add_argument("--negative", nargs="+", metavar="INPUT", help="random documents (e.g. random web pages)")
    p.add_argument("--label-with", type=Path, metavar="CHECKPOINT",
                   help="instead of --positive/--negative: a Llama checkpoint that labels --documents by --label-prompt")
    p.add_argument("--documents", nargs="+", metavar="INPUT", help="documents for --label-with to label")
    p.add_argument("--tokenizer", type=Path, help="the --label-with checkpoint's tokenizer (default: the one beside it)")
    p.add_argument("--label-prompt", default=LABEL_PROMPT, help="yes/no question with {text} where the document "
                   "goes, ending where the answer follows (default: asks for high-quality educational content)")
    p.add_argument("--label-threshold", type=float, default=0.0,
                   help="log p(' Yes') - log p(' No') above which a document is positive (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="documents per forward pass when labelling")
    p.add_argument("--device", help="device for --label-with (default: CUDA when present)")
    p.add_argument("--output", type=Path, required=True, help="the classifier file: .safetensors, or .json")
    p.add_argument("--buckets", type=positive_int, default=DEFAULT_BUCKETS,
                   help=f"hashed feature buckets (default {DEFAULT_BUCKETS:,})")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty of the logistic regression (default 1e-4)")
    p.add_argument("--field", default="text", help="JSON field or Parquet column holding the text (default text)")
    p.add_argument("--separator", help="cut text files into documents at this string")
    p.add_argument("--max-documents", type=positive_int, help="read at most this many documents per set")


def _check_classifier_args(args: argparse.Namespace) -> None:
    from llamakit.errors import DataError

    if args.label_with is None and not (args.positive and args.negative):
        raise DataError("give --positive and --negative documents, or --label-with CHECKPOINT and --documents")
    if args.label_with is not None and not args.documents:
        raise DataError("--label-with needs --documents to label")


TOKENIZER_COMMANDS = {  # name: (add arguments, run)
    "train": (_add_tokenizer_train, tokenizer_train),
}
