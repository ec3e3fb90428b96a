"""`llamakit guard`: classify a user prompt or an agent response as safe or unsafe with a Llama Guard model.

Exit status: 0 safe, 3 unsafe, 4 unparsed (the model answered neither word); 1 is an error, 2 a usage error. Distinct
statuses let a script branch on the verdict (`llamakit guard ... && run`) without parsing the output.
"""

from __future__ import annotations

import argparse
import json
import sys

from llamakit.cli.argtypes import positive_int
from llamakit.errors import LlamakitError

EXIT = {"safe": 0, "unsafe": 3, "unparsed": 4}


def guard(args: argparse.Namespace) -> int:
    """Check a user prompt (or an agent response, with --user or --dialog) against a safety policy with Llama Guard."""
    import yaml

    from llamakit.guard import Guard, load_policy, prompt_text

    policy = load_policy(args.policy)
    if args.show_policy:
        print(yaml.safe_dump(policy.to_dict(), sort_keys=False, allow_unicode=True, width=120), end="")
        return 0
    conversation = _conversation(args)
    if args.print_prompt:
        from llamakit.guard.classify import normalize_conversation

        print(prompt_text(policy, normalize_conversation(conversation, args.role)), end="")
        return 0
    checker = Guard.load(args.checkpoint, args.tokenizer, policy, args.device, _dtype(args.dtype),
                         adapter=args.adapter, max_new_tokens=args.max_new_tokens)
    verdict = checker.check(conversation, args.role)
    if args.json:
        print(json.dumps(verdict.to_dict(), ensure_ascii=False))
    else:
        print(_text(verdict))
    return EXIT[verdict.status]


def _text(verdict) -> str:
    if verdict.unsafe:
        lines = [f"{c.code}: {c.title}" for c in verdict.categories]
        lines += [f"{code}: (not in the policy)" for code in verdict.unknown_codes]
        return "\n".join(["unsafe", *lines])
    return verdict.summary()


def _conversation(args: argparse.Namespace):
    """The conversation to check: --dialog's messages, or the positional text (after --user's message)."""
    if args.dialog is not None:
        if args.text is not None or args.user is not None:
            raise LlamakitError("--dialog holds the whole conversation; drop the positional TEXT and --user")
        return _read_dialog(args.dialog)
    if args.text is None:
        raise LlamakitError("nothing to check: give the TEXT to check ('-' reads stdin), or --dialog FILE")
    text = sys.stdin.read().removesuffix("\n") if args.text == "-" else args.text
    if not text.strip():
        raise LlamakitError("the text to check is empty; give some text")
    if args.user is None:
        return text
    if not args.user.strip():
        raise LlamakitError("--user is empty; give the user message the response answers")
    return [{"role": "user", "content": args.user}, {"role": "assistant", "content": text}]


def _read_dialog(path: str):
    try:
        raw = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as e:
        raise LlamakitError(f"cannot read --dialog {path} ({e.strerror}); pass a JSON file of messages") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise LlamakitError(f"--dialog {path} is not valid JSON ({e.msg} at line {e.lineno}); it should be a list "
                            "of {\"role\": \"user\" | \"assistant\", \"content\": ...} messages") from None


def _dtype(name: str | None):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def add_guard(p: argparse.ArgumentParser) -> None:
    p.epilog = "exit status: 0 safe, 3 unsafe, 4 unparsed answer (neither word); 1 error, 2 usage error"
    p.add_argument("text", nargs="?", metavar="TEXT", help="the user prompt to check, or with --user the agent "
                   "response to check ('-' reads stdin)")
    p.add_argument("--checkpoint", required=True, help="a Llama Guard checkpoint folder (any format)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the one in the checkpoint folder)")
    p.add_argument("--adapter", help="a fine-tuned LoRA adapter folder (PEFT format) to apply on top")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--policy", help="llama-guard-3 (default: its 14 categories S1-S14), llama-guard-1 (the original "
                   "Llama Guard's O1-O6), or a YAML policy file (format, categories: code, name, description)")
    p.add_argument("--user", metavar="TEXT", help="the user message that TEXT answers: TEXT is then checked as the "
                   "agent's response")
    p.add_argument("--dialog", metavar="FILE", help="a JSON list of {role, content} messages (user/assistant, "
                   "alternating); its last message is checked ('-' reads stdin)")
    p.add_argument("--role", choices=["user", "agent"], help="assert whose message is checked (default: the last "
                   "message's role)")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="most tokens of the answer (default 48)")
    p.add_argument("--print-prompt", action="store_true", help="print the exact prompt and exit (no model is loaded)")
    p.add_argument("--show-policy", action="store_true", help="print the policy as YAML (a start for your own) and exit")
