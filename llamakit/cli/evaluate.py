"""`llamakit eval`: benchmark tasks and perplexity on a checkpoint, a table on stdout and a traceable JSON file."""

from __future__ import annotations

import argparse
from pathlib import Path

from llamakit.cli.argtypes import context_window, positive_int
from llamakit.cli.inference import add_model_options, add_tp_option, model_processes, quantization
from llamakit.errors import LlamakitError


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint on tasks (hellaswag, piqa, mmlu, nq, ...) and/or the perplexity of a text."""
    import torch

    from llamakit.eval import EvalOptions, RunLog, format_table, prepare, run_tasks
    from llamakit.eval.runner import run_settings

    paths = _task_paths(args)  # every name and file checked before the model loads
    model, tokenizer, loaded = _load(args)
    trained = model.config.max_seq_len
    window = context_window(args.max_seq_len, trained, "--max-seq-len", args.extend_context)
    opts = EvalOptions(window, args.batch_size, args.limit, args.num_fewshot, args.stride, not args.no_progress,
                       samples=args.samples, temperature=args.temperature, seed=args.seed, pass_k=args.pass_k,
                       timeout=args.timeout, workers=args.workers)
    text_window = context_window(args.window, trained, "--window", args.extend_context, default=window)
    runners = []
    for name, path in paths.items():
        task_opts = opts if name != "perplexity" else EvalOptions(text_window, args.batch_size, stride=args.stride,
                                                                 progress=opts.progress)
        runners.append((name, prepare(name, path, tokenizer, task_opts)))
    torch.manual_seed(args.seed)  # scoring and greedy answers are deterministic; recorded for reproducibility
    settings = {**loaded, "tasks": list(paths), "seed": args.seed}
    log = RunLog(run_settings(opts, **settings), args.output)
    try:
        run_tasks(model, runners, log)
    except LlamakitError as e:
        if args.output and log.results:
            raise LlamakitError(f"{e} (the finished tasks are saved in {args.output})") from None
        raise
    finally:  # after a failure or Ctrl-C too: the finished tasks' table; the error line follows on stderr
        if log.results:
            print(format_table(log.results))
            if args.output:
                print(f"results and per-example records: {args.output}")


def _task_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Task name -> data path, from --tasks, --data TASK=PATH, --data-dir and --text."""
    from llamakit.eval import resolve_path, task_names

    given = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise LlamakitError(f"--data {item!r} is not TASK=PATH; e.g. --data piqa=piqa/valid.jsonl")
        given[task_names(name)[0]] = Path(path)
    names = task_names(args.tasks) if args.tasks else []
    if args.text:
        given["perplexity"] = Path(args.text)
        names = [n for n in names if n != "perplexity"] + ["perplexity"]
    if not names:
        raise LlamakitError("nothing to evaluate; pass --tasks (e.g. --tasks piqa,hellaswag) and/or --text FILE")
    unused = sorted(set(given) - set(names))
    if unused:
        raise LlamakitError(f"--data given for {', '.join(unused)}, which --tasks does not list; add it to --tasks")
    data_dir = Path(args.data_dir) if args.data_dir else None
    return {name: resolve_path(name, given.get(name), data_dir) for name in names}


def _load(args: argparse.Namespace):
    """Model and tokenizer on the chosen device, and the facts that identify them (paths, sha256, dtype,
    quantization)."""
    from llamakit import __version__
    from llamakit.checkpoint import find_tokenizer, load_checkpoint
    from llamakit.eval.readers import sha256_of
    from llamakit.model.transforms import applied
    from llamakit.runtime import default_dtype

    device, mesh = model_processes(args)
    dtype = args.dtype or default_dtype(device)
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, dtype, device, adapter=args.adapter,
                                       transforms=quantization(args, device), mesh=mesh)
    if mesh is not None and mesh.get_local_rank() > 0:
        args.output = None  # every process scores the same examples; the first one writes the results
    checkpoint = Path(args.checkpoint)
    files = [p for p in checkpoint.iterdir() if p.is_file()] if checkpoint.is_dir() else [checkpoint]
    loaded = {"llamakit_version": __version__, "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_of(files),
              "tokenizer": str(tokenizer.path), "tokenizer_sha256": sha256_of([Path(tokenizer.path)]),
              "adapter": args.adapter, "device": str(device), "dtype": str(model.embed_tokens.weight.dtype),
              "transforms": [t.to_dict() for t in applied(model)],  # quantization, given or recorded
              "tokenizer_found_beside_checkpoint": args.tokenizer is None and find_tokenizer(checkpoint) is not None}
    return model, tokenizer, loaded


def add_eval(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_tp_option(p)
    p.add_argument("--tasks", help="comma-separated: hellaswag, piqa, siqa, arc_easy, arc_challenge, openbookqa, "
                   "boolq, winogrande, mmlu, nq, triviaqa, race, race_middle, race_high, gsm8k, math, humaneval, mbpp, "
                   "perplexity")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="a task's data file (or folder; MMLU: the folder with dev/ and test/); repeatable")
    p.add_argument("--data-dir", metavar="DIR", help="look for each task's data in DIR/<task folder> (e.g. "
                   "DIR/piqa/valid.jsonl, DIR/mmlu/, DIR/arc/ARC-Easy/ARC-Easy-Test.jsonl)")
    p.add_argument("--limit", type=positive_int, help="evaluate the first N examples of each task (MMLU: per subject)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--num-fewshot", type=int, choices=range(0, 9), metavar="K",
                   help="shots for MMLU (default 5), QA (default 1, at most 1), gsm8k (default 8) and math (default 4, "
                   "at most 4); other tasks are zero-shot")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled solutions of --samples (the rest of "
                   "evaluation is deterministic); recorded with the results")
    p.add_argument("--samples", type=positive_int, default=0, metavar="K",
                   help="gsm8k, math: also sample K solutions per problem and report maj@k, the accuracy of their most "
                   "common answer (default 0: greedy only); humaneval, mbpp: sample K completions per problem for "
                   "pass@k (default 0: one greedy completion, pass@1)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of --samples (default 0.6, "
                   "top-p 1; humaneval, mbpp: top-p 0.95)")
    p.add_argument("--pass-k", type=_pass_k, default=(1,), metavar="K,K", help="humaneval, mbpp: report pass@k for "
                   "these k (default 1; each at most --samples)")
    p.add_argument("--timeout", type=_seconds, default=3.0, help="humaneval, mbpp: wall-clock seconds each program "
                   "may run in the sandbox (default 3)")
    p.add_argument("--workers", type=positive_int, help="humaneval, mbpp: programs run at once (default: the CPU "
                   "count)")
    p.add_argument("--output", help="write settings, metrics and per-example records to this JSON file (rewritten "
                   "after each task)")
    p.add_argument("--text", metavar="FILE", help="also report the perplexity of this text file")
    p.add_argument("--window", type=positive_int, help="perplexity window in tokens (default: the context window)")
    p.add_argument("--stride", type=positive_int, help="perplexity: start a window every N tokens (default: the "
                   "window, i.e. independent chunks; smaller gives every token more context)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _pass_k(text: str) -> tuple[int, ...]:
    """Comma-separated k of pass@k, e.g. 1,10,100."""
    return tuple(dict.fromkeys(positive_int(k.strip()) for k in text.split(",")))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (above 0, below 3600)")
    return value
