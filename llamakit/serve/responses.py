"""OpenAI's response and stream-chunk shapes, for completions and chat completions."""

from __future__ import annotations

from llamakit.generate.engine import Token
from llamakit.tokenizer import Tokenizer


class TokenTexts:
    """The text of a token as it reads mid-text (a SentencePiece word keeps its leading space), cached."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self._texts = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self._texts:
            decoder = self.tokenizer.stream(follows_text=True)
            self._texts[token] = decoder.push(token) + decoder.flush()
        return self._texts[token]


class Choice:
    """One choice's output so far."""

    def __init__(self, index: int, texts: TokenTexts, logprobs: bool):
        self.index, self.texts, self.logprobs = index, texts, logprobs
        self.text, self.tokens = "", []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.error: str | None = None

    def logprobs_for(self, tokens: list[Token], chat: bool) -> dict | None:
        if not self.logprobs:
            return None
        return _chat_logprobs(tokens, self.texts) if chat else _completion_logprobs(tokens, self.texts)


def _chat_logprobs(tokens: list[Token], text) -> dict:
    def entry(token: int, logprob: float) -> dict:
        t = text(token)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
                        for t in tokens]}


def _completion_logprobs(tokens: list[Token], text) -> dict:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(text(t.id))
    return {"tokens": [text(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text(i): lp for i, lp in t.top} if t.top else None for t in tokens],
            "text_offset": offsets}


def completion_response(id_: str, created: int, model: str, choices: list[Choice], usage: dict) -> dict:
    return {"id": id_, "object": "text_completion", "created": created, "model": model, "usage": usage,
            "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs_for(c.tokens, chat=False),
                         "finish_reason": c.finish_reason} for c in choices]}


def chat_response(id_: str, created: int, model: str, choices: list[Choice], usage: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": created, "model": model, "usage": usage,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": c.logprobs_for(c.tokens, chat=True), "finish_reason": c.finish_reason}
                        for c in choices]}


def completion_chunk(id_: str, created: int, model: str, index: int | None, text: str = "",
                     logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    """A stream chunk; index None gives the usage chunk's empty choice list."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    return {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": choices}


def chat_chunk(id_: str, created: int, model: str, index: int | None, text: str | None = None,
               logprobs: dict | None = None, finish_reason: str | None = None, role: str | None = None) -> dict:
    delta = {"role": role} if role else ({} if finish_reason else {"content": text or ""})
    choices = [] if index is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
