"""`llamakit serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from llamakit.cli.argtypes import byte_size, context_window, positive_int, random_seed
from llamakit.cli.inference import DEFAULT_MAX_SEQ_LEN, add_model_options, quantization
from llamakit.errors import LlamakitError


def serve(args: argparse.Namespace) -> None:
    """Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions) with a chat page at /."""
    from llamakit.checkpoint import load_config
    from llamakit.runtime import resolve_device
    from llamakit.serve.server import ServeConfig
    from llamakit.serve.server import serve as run

    trained = load_config(args.checkpoint).max_seq_len  # a bad checkpoint fails now, before the port opens
    quantization(args, resolve_device(args.device, "--device"))  # and so do bad --quantize settings
    window = context_window(args.max_seq_len, trained, "--max-seq-len", args.extend_context,
                            default=min(trained, DEFAULT_MAX_SEQ_LEN))
    load_guard = _guard_loader(args)  # a bad guard checkpoint or policy also fails before the port opens
    _check_port(args.host, args.port)
    logging.getLogger("llamakit.serve").setLevel(logging.INFO)  # one line per request
    cfg = ServeConfig(model_name=args.served_model_name or Path(args.checkpoint).name, host=args.host, port=args.port,
                      api_key=args.api_key, max_batch_size=args.max_batch_size, max_waiting=args.max_waiting,
                      prefill_chunk=args.prefill_chunk, seed=args.seed, max_body_bytes=args.max_body_size,
                      compile=args.compile)
    run(cfg, lambda: _load(args, window), load_guard)


def _load(args: argparse.Namespace, window: int):
    from llamakit.checkpoint import load_checkpoint
    from llamakit.generate.chat import chat_style
    from llamakit.generate.decode import prepare_for_decoding
    from llamakit.runtime import default_dtype, resolve_device

    device = resolve_device(args.device, "--device")
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.dtype or default_dtype(device), device,
                                       adapter=args.adapter, transforms=quantization(args, device))
    return prepare_for_decoding(model), tokenizer, window, chat_style(model, tokenizer, args.chat_format)


def _guard_loader(args: argparse.Namespace):
    """The function that loads --guard's Guard on the model's device, or None without --guard."""
    if args.guard is None:
        if args.guard_tokenizer or args.guard_policy:
            raise LlamakitError("--guard-tokenizer and --guard-policy need --guard CHECKPOINT")
        return None
    from llamakit.checkpoint import load_config
    from llamakit.guard import Guard, load_policy

    load_config(args.guard)
    policy = load_policy(args.guard_policy)
    return lambda: Guard.load(args.guard, args.guard_tokenizer, policy, args.device)


def _check_port(host: str, port: int) -> None:
    """Fail in one line if the address is taken, rather than after the model has loaded."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise LlamakitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def add_serve(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /")
    p.add_argument("--served-model-name", help="the model name clients pass (default: the checkpoint's folder name)")
    p.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="completions decoded at once: the KV cache's slots (default 8)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="completions queued for a slot before new requests get 429 (default 256)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens prefilled per step, so long prompts do not stall running ones (default 256)")
    p.add_argument("--max-body-size", type=byte_size, default=4 * 2**20, help="largest request body (default 4MiB)")
    p.add_argument("--chat-format", choices=["llama2", "llama3", "alpaca"],
                   help="prompt format (default: the one the model or --adapter was tuned with, else the tokenizer's)")
    p.add_argument("--guard", metavar="CHECKPOINT", help="a Llama Guard checkpoint that checks each request's last "
                   "user message (unsafe: HTTP 400 content_policy_violation) and each response (unsafe: empty, "
                   "finish_reason content_filter; streams are then sent once checked)")
    p.add_argument("--guard-tokenizer", help="the guard's tokenizer file (default: the one beside its weights)")
    p.add_argument("--guard-policy", help="the guard's policy: llama-guard-3 (default), llama-guard-1, or a YAML file")
    p.add_argument("--compile", action="store_true", help="decode with a torch.compile'd step (static shapes, the "
                   "batch padded to 1, 2, 4, 8, ...); every batch size compiles at startup, before /health says ok")
    p.add_argument("--seed", type=random_seed, help="seed of the shared random stream (requests may pass their own)")
