"""The Guard: a Llama Guard checkpoint used as a classifier. It writes the policy and conversation into the published
prompt, greedily generates the short answer with the generate engine, and parses it into a Verdict."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from llamakit.generate import SamplingParams, generate, prepare_for_decoding
from llamakit.guard.prompt import (
    Conversation,
    GuardError,
    Policy,
    chat_style,
    check_conversation,
    check_tokenizer,
    load_policy,
    prompt_ids,
)
from llamakit.guard.verdict import Verdict, parse_verdict
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import stop_ids_for

log = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0)  # a classifier's answer must not depend on a random draw
# 'unsafe' and a line naming all 14 default categories fit in 48 Llama 3 tokens; a longer answer is cut (the
# verdict word comes first, so it is still read) and logged.
DEFAULT_MAX_NEW_TOKENS = 48


class Guard:
    """Checks the last message of a conversation against a policy; one lock serializes calls from threads."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, policy: Policy | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.policy = policy or load_policy()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        check_tokenizer(tokenizer, self.policy)
        self.stop_ids = stop_ids_for(tokenizer, chat_style(self.policy))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, checkpoint: str | Path, tokenizer: str | Path | None = None, policy: Policy | str | Path | None = None,
             device=None, dtype=None, adapter: str | Path | None = None, **options) -> Guard:
        """A Guard over a checkpoint (any format the loaders read, plus an optional LoRA adapter); policy is a Policy,
        a built-in policy's name or a YAML file."""
        from llamakit.checkpoint import load_checkpoint
        from llamakit.runtime import default_dtype, resolve_device

        device = resolve_device(device, "device")
        model, tok = load_checkpoint(checkpoint, tokenizer, dtype or default_dtype(device), device, adapter=adapter)
        policy = policy if isinstance(policy, Policy) else load_policy(policy)
        return cls(prepare_for_decoding(model), tok, policy, **options)

    def prompt(self, conversation: str | Conversation, role: str | None = None) -> list[int]:
        """The prompt ids for one check (role, when given, must be the role of the conversation's last message)."""
        return prompt_ids(self.tokenizer, self.policy, normalize_conversation(conversation, role))

    def check(self, conversation: str | Conversation, role: str | None = None) -> Verdict:
        """Is the last message safe? conversation: a user prompt, or user/assistant messages (ending with the one
        to check); role 'user' or 'agent' asserts whose message that is."""
        return self.check_batch([conversation], role)[0]

    def check_batch(self, conversations: Sequence[str | Conversation], role: str | None = None) -> list[Verdict]:
        """One Verdict per conversation, generated batch_size at a time."""
        prompts = [self.prompt(c, role) for c in conversations]
        window = self.model.config.max_seq_len
        for i, ids in enumerate(prompts):
            if len(ids) + self.max_new_tokens > window:
                raise GuardError(f"conversation {i + 1} makes a {len(ids)}-token prompt; with {self.max_new_tokens} "
                                 f"tokens for the answer it exceeds the guard model's {window}-token context; "
                                 "shorten the conversation (e.g. keep only its last turns)")
        answers = []
        with self._lock:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start:start + self.batch_size]
                answers += generate(self.model, self.tokenizer, batch, self.max_new_tokens, GREEDY,
                                    stop_ids=self.stop_ids)
        verdicts = []
        for answer in answers:
            if answer.finish_reason == "length":
                log.warning("the guard's answer used all %d new tokens: %r", self.max_new_tokens, answer.text)
            verdicts.append(parse_verdict(answer.text, self.policy))
        return verdicts


def normalize_conversation(conversation: str | Conversation, role: str | None) -> Conversation:
    """A str is one user message; the role, when given, must be that of the last message."""
    if role not in (None, "user", "agent"):
        raise GuardError(f"unknown role {role!r}; use 'user' (check a prompt) or 'agent' (check a response)")
    if isinstance(conversation, str):
        if role == "agent":
            raise GuardError("checking an agent response needs the user message it answers too; pass "
                             "[{'role': 'user', ...}, {'role': 'assistant', ...}]")
        conversation = [{"role": "user", "content": conversation}]
    last = check_conversation(conversation)
    if role is not None and last.lower() != role:
        raise GuardError(f"role {role!r} was asked for, but the conversation's last message is from the "
                         f"{last.lower()}; the guard checks the last message, so end the conversation with the one "
                         "to check")
    return conversation
