"""Chat prompts: a dialog of role/content messages as the token ids Llama 2 and Llama 3 chat models expect, or as
Stanford Alpaca prompts (the format an Alpaca-tuned model or adapter answers in)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamakit.errors import TokenizerError
from llamakit.tokenizer.base import Tokenizer

CHAT_STYLES = ("llama2", "llama3", "alpaca")
ROLES = ("system", "user", "assistant")
# Llama 2 marks turns with these plain-text tags, so a user who types them could forge turns.
SPECIAL_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
UNSAFE_REPLY = "Error: special tags are not allowed as part of the prompt."

Dialog = list[dict[str, Any]]
Exchange = tuple[list[int], list[int]]  # (prompt ids, reply ids) of one assistant turn

_DIALOG_SHAPE = ("a dialog is a list of {'role': ..., 'content': ...} dicts: an optional 'system' message first, "
                 "then 'user' and 'assistant' messages alternating, starting and ending with 'user'")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
_ALPACA_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_ALPACA_INTRO_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                            "context. Write a response that appropriately completes the request.")


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


def alpaca_prompt(instruction: str, given: str = "") -> str:
    """Stanford Alpaca's prompt for an instruction (with its input, if any), ending where the response begins."""
    if given:
        return (f"{_ALPACA_INTRO_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{given}\n\n### Response:\n")
    return f"{_ALPACA_INTRO}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, style: str | None = None) -> list[int]:
    """The prompt ids for dialog, ending where the assistant's reply should begin."""
    style = _resolve_style(tokenizer, style)
    check_dialog(dialog)
    if style == "llama3":
        return _encode_llama3(tokenizer, dialog)
    return _encode_turns(tokenizer, dialog, style)


def check_training_dialog(dialog: Dialog) -> None:
    """Raise ChatFormatError unless dialog is a valid dialog followed by a final assistant reply."""
    if not isinstance(dialog, list) or not dialog:
        check_dialog(dialog)  # reports the empty list or the wrong type
    _check_message(len(dialog) - 1, dialog[-1])
    if dialog[-1]["role"] != "assistant":
        raise ChatFormatError(f"the last message (index {len(dialog) - 1}) is from '{dialog[-1]['role']}'; a "
                              "dialog to train on ends with the 'assistant' reply the model should learn")
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in dialog[:-1]):
        raise ChatFormatError("the dialog has no 'user' message before the 'assistant' reply; give every reply "
                              "the user message it answers")
    check_dialog(dialog[:-1])


def encode_exchanges(tokenizer: Tokenizer, dialog: Dialog, style: str | None = None) -> list[Exchange]:
    """A dialog ending in an assistant reply as (prompt ids, reply ids) pairs, one per assistant message.

    Concatenated in order they give the whole training sequence. Each reply holds the assistant's content
    ids and the id that ends it (eos for llama2 and alpaca, <|eot_id|> for llama3); the ids before a reply are what
    encode_dialog gives for the dialog up to the user message it answers.
    """
    style = _resolve_style(tokenizer, style)
    check_training_dialog(dialog)
    if style == "llama3":
        return _llama3_exchanges(tokenizer, dialog)
    return _turn_exchanges(tokenizer, dialog, style)


def _turn_exchanges(tokenizer: Tokenizer, dialog: Dialog, style: str) -> list[Exchange]:
    """Llama 2 or Alpaca exchanges, each split where the assistant's reply begins."""
    dialog = _fold_system(dialog, style)
    pairs = []
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        ids = tokenizer.encode(_exchange(style, user, assistant), bos=True, eos=True)
        # The reply is tokenized in context, as the model would produce it; split after the shared prefix.
        cut = common_prefix(tokenizer.encode(_open_turn(style, user), bos=True), ids)
        pairs.append((ids[:cut], ids[cut:]))
    return pairs


def _llama3_exchanges(tokenizer: Tokenizer, dialog: Dialog) -> list[Exchange]:
    """Llama 3 messages grouped into (everything up to an open assistant header, the reply's content + eot)."""
    special = _llama3_specials(tokenizer)
    pairs, prompt = [], [special["<|begin_of_text|>"]]
    for message in dialog:
        prompt += _llama3_header(tokenizer, special, message["role"])
        content = tokenizer.encode(message["content"].strip()) + [special["<|eot_id|>"]]
        if message["role"] == "assistant":
            pairs.append((prompt, content))
            prompt = []
        else:
            prompt += content
    return pairs


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def stop_ids_for(tokenizer: Tokenizer, style: str | None = None) -> frozenset[int]:
    """The ids that end an assistant reply in this chat style."""
    if _resolve_style(tokenizer, style) != "llama3":
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


def _encode_turns(tokenizer: Tokenizer, dialog: Dialog, style: str) -> list[int]:
    """Llama 2 and Alpaca: each finished exchange is its own bos..eos sequence; the last user turn stays open."""
    dialog = _fold_system(dialog, style)
    ids: list[int] = []
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        ids += tokenizer.encode(_exchange(style, user, assistant), bos=True, eos=True)
    return ids + tokenizer.encode(_open_turn(style, dialog[-1]), bos=True)


def _fold_system(dialog: Dialog, style: str) -> Dialog:
    """dialog with a leading system message folded into the first user message (Llama 2 has no system turn)."""
    if dialog[0]["role"] != "system":
        return dialog
    if style == "alpaca":
        raise ChatFormatError("the alpaca format has no system message (its prompt opens with a fixed sentence); "
                              "drop the system message, or use the llama2 or llama3 chat format")
    folded = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
    return [{"role": "user", "content": folded}, *dialog[2:]]


def _open_turn(style: str, user: dict[str, Any]) -> str:
    """A Llama 2 or Alpaca user turn waiting for its reply (Alpaca's as the instruction, unchanged, as in training)."""
    if style == "alpaca":
        return alpaca_prompt(user["content"])
    return f"[INST] {user['content'].strip()} [/INST]"


def _exchange(style: str, user: dict[str, Any], assistant: dict[str, Any]) -> str:
    """A finished Llama 2 or Alpaca exchange (Llama 2's trailing space follows Meta's reference format)."""
    if style == "alpaca":
        return _open_turn(style, user) + assistant["content"]
    return f"{_open_turn(style, user)} {assistant['content'].strip()} "


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
