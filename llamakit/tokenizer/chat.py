"""Chat prompts: a dialog of role/content messages as the token ids Llama 2 and Llama 3 chat models expect."""

from __future__ import annotations

from typing import Any

from llamakit.errors import TokenizerError
from llamakit.tokenizer.base import Tokenizer

CHAT_STYLES = ("llama2", "llama3")
ROLES = ("system", "user", "assistant")
# Llama 2 marks turns with these plain-text tags, so a user who types them could forge turns.
SPECIAL_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
UNSAFE_REPLY = "Error: special tags are not allowed as part of the prompt."

Dialog = list[dict[str, Any]]

_DIALOG_SHAPE = ("a dialog is a list of {'role': ..., 'content': ...} dicts: an optional 'system' message first, "
                 "then 'user' and 'assistant' messages alternating, starting and ending with 'user'")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


class ChatFormatError(TokenizerError):
    """A dialog or chat style that cannot be turned into a prompt."""


def default_style(tokenizer: Tokenizer) -> str:
    """The chat style a tokenizer's models were tuned on: llama3 when it has Llama 3's header tokens."""
    return "llama3" if "<|start_header_id|>" in tokenizer.special_tokens else "llama2"


def check_dialog(dialog: Dialog) -> None:
    """Raise ChatFormatError unless dialog has valid messages in an order a chat model can answer."""
    if not isinstance(dialog, list) or not dialog:
        what = "an empty list" if isinstance(dialog, list) else f"a {type(dialog).__name__}"
        raise ChatFormatError(f"the dialog is {what}; {_DIALOG_SHAPE}")
    for index, message in enumerate(dialog):
        _check_message(index, message)
    start = 1 if dialog[0]["role"] == "system" else 0  # a leading system message sits outside the turns
    for index in range(start, len(dialog)):
        role = dialog[index]["role"]
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role == "system":
            raise ChatFormatError(f"message {index} is a system message, but only the first message may be one; "
                                  "move its content into the first message or drop it")
        if role != expected:
            raise ChatFormatError(f"message {index} is from '{role}' but should be from '{expected}'; {_DIALOG_SHAPE}")
    if dialog[-1]["role"] != "user":
        raise ChatFormatError(f"the last message (index {len(dialog) - 1}) is from '{dialog[-1]['role']}', but the "
                              "model answers a user message; end the dialog with a 'user' message")


def _check_message(index: int, message: Any) -> None:
    """Raise ChatFormatError unless message is a dict with a known str role and a str content."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"message {index} is a {type(message).__name__}, not a dict; {_DIALOG_SHAPE}")
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            got = "missing" if key not in message else f"a {type(message[key]).__name__}"
            raise ChatFormatError(f"message {index} has no str '{key}' ({got}); give every message str 'role' "
                                  "and 'content' values")
    if message["role"] not in ROLES:
        raise ChatFormatError(f"message {index} has unknown role '{message['role']}'; use one of "
                              f"{', '.join(ROLES)}")


def has_special_tags(dialog: Dialog) -> bool:
    """Whether any message content contains a Llama 2 turn tag (callers refuse such dialogs)."""
    # Tolerates malformed messages, so that encode_dialog is the one place that reports them.
    return any(tag in message["content"] for message in dialog
               if isinstance(message, dict) and isinstance(message.get("content"), str) for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, style: str | None = None) -> list[int]:
    """The prompt ids for dialog, ending where the assistant's reply should begin."""
    style = _resolve_style(tokenizer, style)
    check_dialog(dialog)
    if style == "llama2":
        return _encode_llama2(tokenizer, dialog)
    return _encode_llama3(tokenizer, dialog)


def stop_ids_for(tokenizer: Tokenizer, style: str | None = None) -> frozenset[int]:
    """The ids that end an assistant reply in this chat style."""
    if _resolve_style(tokenizer, style) == "llama2":
        return frozenset({tokenizer.eos_id})
    _llama3_specials(tokenizer)  # a tokenizer without the header tokens cannot chat in this style
    special = tokenizer.special_tokens
    return frozenset(special[name] for name in _LLAMA3_STOPS if name in special)


def _resolve_style(tokenizer: Tokenizer, style: str | None) -> str:
    """style, or the tokenizer's default when None; unknown styles raise ChatFormatError."""
    if style is None:
        return default_style(tokenizer)
    if style not in CHAT_STYLES:
        raise ChatFormatError(f"unknown chat style {style!r}; use one of {', '.join(CHAT_STYLES)} "
                              "(or None to pick the tokenizer's default)")
    return style


def _encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Llama 2: each finished exchange is its own bos..eos sequence; the last user turn stays open."""
    if dialog[0]["role"] == "system":
        # Llama 2 has no system turn: the system prompt rides inside the first user message.
        folded = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
        dialog = [{"role": "user", "content": folded}, *dialog[2:]]
    ids: list[int] = []
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {assistant['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    return ids + tokenizer.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]", bos=True)


def _encode_llama3(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Llama 3: one sequence of header-delimited messages, then an open assistant header."""
    special = _llama3_specials(tokenizer)
    ids = [special["<|begin_of_text|>"]]
    for message in dialog:
        ids += _llama3_header(tokenizer, special, message["role"])
        ids += tokenizer.encode(message["content"].strip()) + [special["<|eot_id|>"]]
    return ids + _llama3_header(tokenizer, special, "assistant")


def _llama3_header(tokenizer: Tokenizer, special: dict[str, int], role: str) -> list[int]:
    """The ids that open a Llama 3 message from role."""
    return ([special["<|start_header_id|>"]] + tokenizer.encode(role) + [special["<|end_header_id|>"]]
            + tokenizer.encode("\n\n"))


def _llama3_specials(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's special ids, or ChatFormatError when it lacks those the llama3 style needs."""
    special = tokenizer.special_tokens
    missing = [name for name in _LLAMA3_SPECIALS if name not in special]
    if missing:
        raise ChatFormatError(f"the llama3 chat style needs a Llama 3 tokenizer, but {tokenizer.path} "
                              f"({tokenizer.kind}) has no {', '.join(missing)}; load Llama 3's tokenizer.model, "
                              "or use style='llama2'")
    return special
