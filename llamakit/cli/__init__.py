"""`llamakit <command>`: a table of commands. Errors a user can cause print one line and exit 1."""

from __future__ import annotations

import argparse
import logging
import sys

from llamakit.cli.checkpoints import (
    add_convert,
    add_download,
    add_info,
    add_quantize,
    convert,
    download,
    info,
    quantize,
)
from llamakit.cli.data import (
    add_prepare,
    add_prepare_classifier,
    add_tokenizer,
    prepare,
    prepare_classifier,
    tokenizer_tools,
)
from llamakit.cli.evaluate import add_eval, evaluate
from llamakit.cli.guard import add_guard, guard
from llamakit.cli.inference import add_chat, add_generate, chat, generate
from llamakit.cli.rejection import add_rejection_sample, rejection_sample
from llamakit.cli.scaling import add_scaling, scaling
from llamakit.cli.serve import add_serve, serve
from llamakit.cli.train import (
    add_dpo,
    add_finetune,
    add_merge,
    add_ppo,
    add_pretrain,
    add_reward,
    dpo,
    finetune,
    merge,
    ppo,
    pretrain,
    reward,
)
from llamakit.errors import LlamakitError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {  # name: (add arguments, run)
    "generate": (add_generate, generate),
    "chat": (add_chat, chat),
    "download": (add_download, download),
    "convert": (add_convert, convert),
    "quantize": (add_quantize, quantize),
    "info": (add_info, info),
    "prepare": (add_prepare, prepare),
    "prepare-classifier": (add_prepare_classifier, prepare_classifier),
    "tokenizer": (add_tokenizer, tokenizer_tools),
    "pretrain": (add_pretrain, pretrain),
    "finetune": (add_finetune, finetune),
    "dpo": (add_dpo, dpo),
    "reward": (add_reward, reward),
    "ppo": (add_ppo, ppo),
    "merge": (add_merge, merge),
    "rejection-sample": (add_rejection_sample, rejection_sample),
    "eval": (add_eval, evaluate),
    "serve": (add_serve, serve),
    "scaling": (add_scaling, scaling),
    "guard": (add_guard, guard),
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
        status = COMMANDS[args.command][1](args)  # a command may return an exit status (guard: its verdict)
    except LlamakitError as e:
        sys.stderr.write(f"llamakit {args.command}: error: {e}\n")  # one write: torchrun ranks' lines never interleave
        return 1
    except KeyboardInterrupt:
        print(f"llamakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0
