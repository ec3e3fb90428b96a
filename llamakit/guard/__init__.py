"""Llama Guard safety classification: a Llama model that answers 'safe' or 'unsafe' plus the violated categories of
a policy, for a user prompt or an agent response."""

from llamakit.guard.classify import Guard
from llamakit.guard.prompt import (
    LLAMA_GUARD_1,
    LLAMA_GUARD_3,
    Category,
    GuardError,
    Policy,
    load_policy,
    policy_from_dict,
    prompt_ids,
    prompt_text,
)
from llamakit.guard.verdict import Verdict, parse_verdict

__all__ = ["LLAMA_GUARD_1", "LLAMA_GUARD_3", "Category", "Guard", "GuardError", "Policy", "Verdict", "load_policy",
           "parse_verdict", "policy_from_dict", "prompt_ids", "prompt_text"]
