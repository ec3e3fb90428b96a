"""`llamakit serve --guard`: a Llama Guard model checks each request's user message before generation and each
response after it, and the server answers in OpenAI's shapes:

- an unsafe prompt: HTTP 400, error code "content_policy_violation", naming the violated categories; nothing is
  generated;
- an unsafe response: a normal completion whose choice has finish_reason "content_filter" and empty content (OpenAI's
  way of saying output was withheld); with stream=true the response is held back until the guard has read it whole.

An answer the guard model does not give in its format ("unparsed") is treated as unsafe: the check fails closed.
Guard calls run on a worker thread (one at a time: Guard holds a lock), so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

from llamakit.guard import Guard, Verdict
from llamakit.guard.prompt import Conversation
from llamakit.serve.responses import Choice

log = logging.getLogger(__name__)

REFUSAL_CODE = "content_policy_violation"
FILTERED = "content_filter"


def chat_conversation(dialog: list[dict]) -> Conversation:
    """A chat dialog as the guard reads it: Llama Guard's prompt has no place for a system message."""
    return [m for m in dialog if m["role"] != "system"]


def prompt_conversations(texts: list[str]) -> list[Conversation]:
    """Completion prompts, each checked as a user message."""
    return [[{"role": "user", "content": text}] for text in texts]


async def check(guard: Guard, conversations: list[Conversation]) -> list[Verdict]:
    verdicts = await asyncio.to_thread(guard.check_batch, conversations)
    for verdict in verdicts:
        if not verdict.parsed:
            log.warning("the guard answered neither safe nor unsafe (%r); refusing, to fail closed", verdict.raw)
    return verdicts


async def refusal(guard: Guard, conversations: list[Conversation]) -> str | None:
    """Why the request's prompts may not be answered, or None when the guard finds them all safe."""
    for i, verdict in enumerate(await check(guard, conversations)):
        if not verdict.safe:
            which = f"prompt {i + 1}" if len(conversations) > 1 else "the prompt"
            return f"{which} was refused by the content policy ({verdict.summary()}); rephrase the request"
    return None


async def moderate(guard: Guard, conversations: list[Conversation], choices: list[Choice]) -> None:
    """Withhold every response the guard does not find safe: empty text, finish_reason content_filter. Choice i
    answers conversation i * len(conversations) // len(choices) (n choices per prompt, in order)."""
    per_prompt = len(choices) // len(conversations)
    done = [c for c in choices if c.error is None]
    checked = [conversations[c.index // per_prompt] + [{"role": "assistant", "content": c.text}] for c in done]
    for choice, verdict in zip(done, await check(guard, checked) if checked else []):
        if not verdict.safe:
            log.info("choice %d withheld by the guard: %s", choice.index, verdict.summary())
            choice.text, choice.tokens, choice.finish_reason = "", [], FILTERED
