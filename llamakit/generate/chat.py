"""A running conversation: the history kept within the context window, each reply streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from llamakit.errors import LlamakitError
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.decode import stream
from llamakit.generate.sampling import SamplingParams
from llamakit.generate.speculative import Speculation
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import (
    SPECIAL_TAGS,
    ChatFormatError,
    default_style,
    encode_dialog,
    has_special_tags,
    stop_ids_for,
)

log = logging.getLogger(__name__)


def chat_style(model: Transformer, tokenizer: Tokenizer, style: str | None = None) -> str:
    """The prompt format asked for, else the one the model was tuned with (its config), else the tokenizer's."""
    return style or model.config.chat_format or default_style(tokenizer)


class ChatSession:
    """Dialog state for one user; `reply(text)` streams the assistant's answer and records it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_seq_len: int, max_new_tokens: int,
                 params: SamplingParams, system: str | None = None, style: str | None = None,
                 generator: torch.Generator | None = None, compiled: CompiledDecode | None = None,
                 speculation: Speculation | None = None):
        self.compiled = compiled  # a compiled decode step (one compile: the cache's shape never changes)
        self.speculation = speculation  # replies decoded speculatively (with a draft model or prompt lookup)
        self.model, self.tokenizer, self.params, self.generator = model, tokenizer, params, generator
        self.max_seq_len, self.max_new_tokens = max_seq_len, max_new_tokens
        self.style = chat_style(model, tokenizer, style)
        self.stop_ids = stop_ids_for(tokenizer, self.style)
        self.system = system
        if system:  # a bad one (Llama 2 tags, the alpaca format has none) is refused now, not at every reply
            self._check_text(system, "the system prompt")
            encode_dialog(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": "?"}],
                          self.style)
        self.messages: list[dict[str, str]] = []  # user/assistant turns, oldest first
        self.dropped = 0  # turns removed from the front by the last reply() to fit the window
        self.cache = KVCache.for_model(model, 1, max_seq_len)  # once: every reply reuses it

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to the user's text. Closing the iterator early keeps the partial answer."""
        if not text.strip():
            raise LlamakitError("empty message; type something, or /help for commands")
        self._check_text(text, "this message")
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self._fit_prompt()
        except LlamakitError:
            self.messages[:] = before  # a refused message costs no history
            raise
        budget = min(self.max_new_tokens, self.max_seq_len - len(prompt))
        answer = []
        try:
            if self.speculation is not None:
                pieces = self.speculation.stream(self.tokenizer, prompt, budget, self.params, stop_ids=self.stop_ids,
                                                 generator=self.generator, follows_prompt=False)
            else:
                pieces = stream(self.model, self.tokenizer, prompt, budget, self.params, stop_ids=self.stop_ids,
                                generator=self.generator, follows_prompt=False, cache=self.cache,
                                compiled=self.compiled)
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:  # also on an interrupted reply, so the next turn sees what the user saw
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def _check_text(self, text: str, what: str) -> None:
        """Llama 2 marks turns with plain-text tags, so text containing one could forge a turn: refuse it, as
        Meta's API refuses such dialogs."""
        if self.style == "llama2" and has_special_tags([{"role": "user", "content": text}]):
            raise ChatFormatError(f"{what} contains a Llama 2 turn tag ({', '.join(SPECIAL_TAGS)}), which could "
                                  "forge a turn in the llama2 chat format; rephrase it without the tag")

    def _fit_prompt(self) -> list[int]:
        """The prompt ids, after dropping the oldest exchanges until a reply has room."""
        # Leave room for a full reply, but never demand more than half the window for it.
        limit = self.max_seq_len - min(self.max_new_tokens, self.max_seq_len // 2)
        self.dropped = 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            prompt = encode_dialog(self.tokenizer, system + self.messages, self.style)
            if len(prompt) <= limit:
                return prompt
            if len(self.messages) == 1:
                raise LlamakitError(f"this message makes a {len(prompt)}-token prompt, more than the {limit} tokens "
                                    f"that leave room for a reply within max_seq_len={self.max_seq_len}; shorten it "
                                    "(or the system prompt), or raise --max-seq-len")
            del self.messages[:2]  # the oldest user turn and its answer
            self.dropped += 2
