"""Reading a Llama Guard model's answer: 'safe', or 'unsafe' with a second line of comma-separated category codes.

The parser never raises: an answer that starts with neither word is an "unparsed" verdict that keeps the raw text,
so a caller decides how to treat it (the CLI exits with its own status; the server refuses, failing closed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llamakit.guard.prompt import Category, Policy

SAFE, UNSAFE, UNPARSED = "safe", "unsafe", "unparsed"
_END_MARKERS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>")  # a stop token decoded as text ends the answer
_VERDICT = re.compile(r"(safe|unsafe)\b", re.IGNORECASE)  # the first word; 'safely' or 'unsafety' is no verdict
_CODE = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]+[0-9]+)(?![A-Za-z0-9])")


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: status is safe, unsafe or unparsed; categories are the policy's violated ones."""

    status: str
    categories: tuple[Category, ...] = ()
    unknown_codes: tuple[str, ...] = ()  # codes the model named that the policy does not have
    raw: str = field(default="", repr=False)

    @property
    def safe(self) -> bool:
        return self.status == SAFE

    @property
    def unsafe(self) -> bool:
        return self.status == UNSAFE

    @property
    def parsed(self) -> bool:
        return self.status != UNPARSED

    def to_dict(self) -> dict:
        return {"verdict": self.status, "safe": self.safe,
                "categories": [{"code": c.code, "name": c.title} for c in self.categories],
                "unknown_codes": list(self.unknown_codes), "raw": self.raw}

    def summary(self) -> str:
        """One line: 'safe', 'unsafe: S1 (Violent Crimes), ...' or 'unparsed: <the raw answer>'."""
        if self.status == SAFE:
            return SAFE
        if self.status == UNPARSED:
            return f"{UNPARSED}: {self.raw.strip()!r}"
        named = [f"{c.code} ({c.title})" for c in self.categories] + [f"{code} (not in the policy)"
                                                                       for code in self.unknown_codes]
        return f"{UNSAFE}: {', '.join(named)}" if named else f"{UNSAFE} (no category given)"


def parse_verdict(raw: str, policy: Policy) -> Verdict:
    """The verdict in a guard model's answer, tolerant of case, surrounding whitespace, spaces after commas and text
    after the category line; codes are matched to the policy case-insensitively, unknown ones reported."""
    text = _before_end_marker(raw).strip()
    match = _VERDICT.match(text)
    if match is None:
        return Verdict(UNPARSED, raw=raw)
    if match.group(1).lower() == SAFE:
        return Verdict(SAFE, raw=raw)
    rest = text[match.end():].lstrip(" \t:,")
    # The codes sit on the second line; some models put them after the word on the first.
    first, *others = rest.split("\n")
    line = first if _CODE.search(first) else next((ln for ln in others if ln.strip()), "")
    known, unknown = [], []
    for code in dict.fromkeys(c.upper() for c in _CODE.findall(line)):  # in order, without repeats
        category = policy.category(code)
        if category is None:
            unknown.append(code)
        else:
            known.append(category)
    return Verdict(UNSAFE, tuple(known), tuple(unknown), raw)


def _before_end_marker(text: str) -> str:
    cut = min((i for i in (text.find(m) for m in _END_MARKERS) if i >= 0), default=len(text))
    return text[:cut]
