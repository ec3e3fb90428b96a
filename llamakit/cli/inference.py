"""`llamakit generate` and `llamakit chat`: text from a model, with shared model and sampling options."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import time

from llamakit.cli.argtypes import context_window, positive_int, random_seed
from llamakit.errors import LlamakitError

DEFAULT_MAX_SEQ_LEN = 4096  # the default context window for generate/chat: long enough, yet a small KV cache


def generate(args: argparse.Namespace) -> None:
    """Complete prompts with a model and print each prompt with its continuation; one prompt streams."""
    from llamakit.generate import generate as run_batch
    from llamakit.generate import stream

    model, tokenizer, params, generator = load_for_generation(args)
    prompts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in args.prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise LlamakitError(f"prompt {i + 1} is empty; give some text (or '-' to read it from stdin)")
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    window = max_seq_len(args, model)
    budgets = [_budget(args.max_new_tokens, window, len(p), i) for i, p in enumerate(ids)]
    compiled = compiled_decode(args, model)
    speculation = load_speculation(args, model, tokenizer)
    start = time.perf_counter()
    if len(ids) == 1:
        print(prompts[0], end="", flush=True)  # then its continuation as it is generated
        if speculation is not None:
            pieces = speculation.stream(tokenizer, ids[0], budgets[0], params, stop_strings=args.stop,
                                        generator=generator)
        else:
            pieces = stream(model, tokenizer, ids[0], budgets[0], params, stop_strings=args.stop, generator=generator,
                            compiled=compiled)
        completions = [_print_stream(pieces)]
    else:
        if speculation is not None:  # one batch too: every row drafts, one target forward verifies them all
            completions = speculation.generate(tokenizer, ids, budgets, params, stop_strings=args.stop,
                                               generator=generator)
        else:
            completions = run_batch(model, tokenizer, ids, budgets, params, stop_strings=args.stop,
                                    generator=generator, compiled=compiled)
        print("\n\n".join(prompt + completion.text for prompt, completion in zip(prompts, completions)))
    if speculation is not None:
        print(speculation.summary(), file=sys.stderr)
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

    model, tokenizer, params, generator = load_for_generation(args)
    session = ChatSession(model, tokenizer, max_seq_len=max_seq_len(args, model), max_new_tokens=args.max_new_tokens,
                          params=params, system=args.system, style=args.chat_format, generator=generator,
                          compiled=compiled_decode(args, model), speculation=load_speculation(args, model, tokenizer))
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(f"chatting with {args.checkpoint}{adapter} ({session.style} format). {CHAT_HELP}")
    read = read_line if args.tp == 1 else _read_line_on_first
    while True:
        try:
            if not _chat_command(session, read("\n>>> ")):
                return
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt, or just after a reply: a fresh prompt, the chat goes on
            print()


CHAT_HELP = "Type a message. /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def _chat_command(session, text: str) -> bool:
    """Act on one line typed at the prompt; False when it asks to quit."""
    command = text.strip().lower()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        print("[conversation cleared]")
    elif command == "/help":
        print(CHAT_HELP)
    elif command:
        _chat_turn(session, text)
    return True


def read_line(prompt: str) -> str:
    """input(prompt), except that on a terminal a Ctrl-C typed as soon as the prompt shows is never lost.

    input() blocks in read(): a SIGINT that lands after the prompt is written but before read() starts only
    sets Python's flag, and its KeyboardInterrupt waits for the next Enter. Waiting in short select() calls
    returns to Python, which raises it, at least every 0.1 s.
    """
    if os.name == "nt" or not sys.stdin.isatty():
        return input(prompt)
    print(prompt, end="", flush=True)
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass
    line = sys.stdin.readline()  # a terminal in line mode is readable once a whole line (or Ctrl-D) is typed
    if not line:
        raise EOFError
    return line.removesuffix("\n")


def _read_line_on_first(prompt: str) -> str:
    """With --tp: the first process reads the line, and every process gets it (None stands for end of input)."""
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == 0:
        with contextlib.suppress(EOFError, KeyboardInterrupt):  # under torchrun, either ends the chat everywhere
            box[0] = read_line(prompt)
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise EOFError
    return box[0]


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
        if session.speculation is not None:
            print(session.speculation.summary(), file=sys.stderr)
    except KeyboardInterrupt:
        reply.close()
        print("\n[reply stopped]")
    except LlamakitError as e:
        print(f"error: {e}")


def load_for_generation(args: argparse.Namespace):
    """Model (on CUDA when present), tokenizer, sampling settings and a seeded random generator."""
    import torch

    from llamakit.checkpoint import load_checkpoint
    from llamakit.generate import SamplingParams
    from llamakit.generate.decode import prepare_for_decoding
    from llamakit.runtime import default_dtype

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty)
    device, mesh = model_processes(args)
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.dtype or default_dtype(device), device,
                                       adapter=args.adapter, transforms=quantization(args, device), mesh=mesh)
    generator = torch.Generator(device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    if mesh is not None:  # every process must draw the same tokens: the first one's seed for all
        generator.manual_seed(_shared_seed(generator.initial_seed()))
    return prepare_for_decoding(model), tokenizer, params, generator


def model_processes(args: argparse.Namespace):
    """The device, and with --tp N under torchrun the mesh of the N processes that split the model (else None).

    With --tp, only the first process prints; the others compute their share of every token silently."""
    from llamakit.runtime import device_mesh, init_processes, job_size, resolve_device

    tp = getattr(args, "tp", 1)  # commands without --tp (serve, rejection-sample) run on one process
    if tp == 1:
        return resolve_device(args.device, "--device"), None
    world = job_size()
    if world != tp:
        raise LlamakitError(f"--tp {tp} splits the model over {tp} processes, but this job has {world}; run "
                            f"it as torchrun --nproc_per_node {tp} -m llamakit {args.command} ...")
    if getattr(args, "compile", False) or getattr(args, "draft_checkpoint", None) or getattr(args, "prompt_lookup", 0):
        raise LlamakitError("--tp runs eager, plain decoding: leave out --compile, --draft-checkpoint and "
                            "--prompt-lookup")
    procs = init_processes(args.device, "--device").with_layout(tp=tp, names=("--tp", "pp"))
    if not procs.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return procs.device, device_mesh(procs)["tp"]


def _shared_seed(seed: int) -> int:
    import torch.distributed as dist

    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compiled_decode(args: argparse.Namespace, model):
    """The torch.compile'd decode step that --compile asks for, else None (eager)."""
    from llamakit.generate.compiled import CompiledDecode

    return CompiledDecode(model) if args.compile else None


def add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="decode with a torch.compile'd step (static shapes): the "
                   "first token of each batch size waits for a compile (seconds to a minute), later steps run faster; with "
                   "--draft-checkpoint, the draft model's step is the one compiled")


def load_speculation(args: argparse.Namespace, model, tokenizer):
    """The Speculation that --draft-checkpoint or --prompt-lookup asks for, else None."""
    from llamakit.checkpoint import load_checkpoint
    from llamakit.generate import Speculation
    from llamakit.generate.decode import prepare_for_decoding
    from llamakit.runtime import default_dtype

    if args.draft_checkpoint and args.prompt_lookup:
        raise LlamakitError("--draft-checkpoint and --prompt-lookup are two ways to draft; choose one")
    if not args.draft_checkpoint and not args.prompt_lookup:
        if args.speculate is not None or args.draft_tokenizer:
            raise LlamakitError("--speculate and --draft-tokenizer need --draft-checkpoint (or --prompt-lookup)")
        return None
    gamma = 4 if args.speculate is None else args.speculate
    compile = getattr(args, "compile", False)
    if not args.draft_checkpoint:
        return Speculation(model, None, gamma, args.max_ngram, compile=compile)
    device = model.embed_tokens.weight.device
    draft, draft_tokenizer = load_checkpoint(args.draft_checkpoint, args.draft_tokenizer or args.tokenizer,
                                             args.dtype or default_dtype(device), device)
    probe = "Speculative decoding needs one vocabulary: 0123456789, ÄÖÜ, 日本語."
    if (draft_tokenizer.vocab_size != tokenizer.vocab_size
            or draft_tokenizer.encode(probe, bos=True) != tokenizer.encode(probe, bos=True)):
        raise LlamakitError(f"the draft's tokenizer ({draft_tokenizer.vocab_size} tokens) is not the target's "
                            f"({tokenizer.vocab_size} tokens); give a draft trained with the target's tokenizer, "
                            "or its tokenizer with --draft-tokenizer")
    return Speculation(model, prepare_for_decoding(draft.eval()), gamma, compile=compile)


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-checkpoint", help="a small draft model with the same vocabulary: speculative decoding "
                   "(exact: the output follows the target's distribution)")
    p.add_argument("--draft-tokenizer", help="the draft's tokenizer (default: --tokenizer, or the one beside the "
                   "draft); it must be the target's")
    p.add_argument("--speculate", type=positive_int, metavar="GAMMA", help="tokens drafted per step (default 4)")
    p.add_argument("--prompt-lookup", action="store_true", help="draft by prompt lookup: the tokens that followed "
                   "the last n-gram earlier in the prompt or output")
    p.add_argument("--max-ngram", type=positive_int, default=3, help="longest n-gram prompt lookup matches (default 3)")


def quantization(args: argparse.Namespace, device) -> list:
    """The load transforms that --quantize and --group-size ask for (none without --quantize)."""
    from llamakit.model.quantize import quantization as transforms

    if args.group_size is not None and args.quantize != "int4":
        raise LlamakitError("--group-size applies to --quantize int4 only")
    return transforms(args.quantize, args.group_size, device)


def max_seq_len(args: argparse.Namespace, model) -> int:
    trained = model.config.max_seq_len
    return context_window(args.max_seq_len, trained, "--max-seq-len", args.extend_context,
                          default=min(trained, DEFAULT_MAX_SEQ_LEN))


def _budget(max_new_tokens: int, window: int, prompt_len: int, index: int) -> int:
    """New tokens for a prompt: max_new_tokens, cut short where the context window ends."""
    if prompt_len >= window:
        raise LlamakitError(f"prompt {index + 1} has {prompt_len} tokens, leaving no room in the {window}-token "
                            "context window; shorten it or raise --max-seq-len")
    return min(max_new_tokens, window - prompt_len)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (any format) or llama2.c .bin file")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one in the checkpoint folder)")
    p.add_argument("--adapter", help="a fine-tuned LoRA/prefix/prompt adapter folder (PEFT format) to apply on top")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of every linear layer and "
                   "the output head while loading (CPU): int8 per output channel, int4 in groups of --group-size")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="input columns sharing an int4 scale and zero point (default 32; larger: smaller, less exact)")
    p.add_argument("--max-seq-len", type=positive_int,
                   help=f"context window for prompt + reply (default: the model's, at most {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--extend-context", action="store_true",
                   help="allow --max-seq-len (and eval's --window) beyond the model's trained context, with a warning")


def add_tp_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor parallelism: split the model over "
                   "the N processes of `torchrun --nproc_per_node N -m llamakit ...`, each reading only its share")


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 disables)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 disables)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 disables)")
    p.add_argument("--seed", type=random_seed, help="make sampling reproducible")


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue ('-' reads stdin); several run "
                   "as one batch")
    add_model_options(p)
    add_tp_option(p)
    add_sampling_options(p, max_new_tokens=256)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--stats", action="store_true", help="print the time taken to stderr")
    add_compile_option(p)
    add_speculation_options(p)


def add_chat(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_tp_option(p)
    add_sampling_options(p, max_new_tokens=512)
    add_compile_option(p)
    add_speculation_options(p)
    p.add_argument("--system", help="system prompt for the whole conversation")
    p.add_argument("--chat-format", choices=["llama2", "llama3", "alpaca"],
                   help="prompt format (default: the one the model or --adapter was tuned with, else the tokenizer's)")
