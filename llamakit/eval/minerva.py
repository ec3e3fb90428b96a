"""Minerva's answer handling for MATH (Lewkowycz et al., 2022, appendix D): reading \\boxed{} and normalising answers.

`normalize_final_answer` is the published function, step for step, so that scores compare with
published ones, quirks included: units are removed as substrings anywhere ("ft" also leaves "\\left"
as "\\le"), and "a "/"an " are dropped wherever they end a word. Both sides of a comparison pass
through it, so such a quirk hurts only when it makes two different answers equal.
"""

from __future__ import annotations

import re

# (before, after), applied in order with str.replace
SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
# removed wherever they occur, in order (after the substitutions, so there are no spaces left)
REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)
# (pattern, replacement), applied in order with re.sub
_UNWRAP = (
    (r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$"),  # keep only the first $...$ span
    (r"(\\text\{)(.*?)(\})", r"\2"),
    (r"(\\textbf\{)(.*?)(\})", r"\2"),
    (r"(\\overline\{)(.*?)(\})", r"\2"),
    (r"(\\boxed\{)(.*)(\})", r"\2"),
    (r"(frac)([^{])(.)", r"frac{\2}{\3}"),  # \frac12 -> \frac{1}{2}
    (r"(sqrt)([^{])", r"sqrt{\2}"),  # \sqrt2 -> \sqrt{2}
)


def normalize_final_answer(answer: str) -> str:
    """An answer in the canonical form Minerva compares: the right side of its last '=', without spaces,
    units, \\text/\\boxed wrappers or dollar signs, with shorthand \\frac and \\sqrt braced and an integer's
    thousands commas removed."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in REMOVED_EXPRESSIONS:
        answer = answer.replace(expression, "")
    for pattern, replacement in _UNWRAP:
        answer = re.sub(pattern, replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def last_boxed(text: str) -> str | None:
    """The content of the text's last \\boxed{...} (or \\fbox{...}; '\\boxed x' runs to the next '$'), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0]
    opening = rest.find("{")
    if opening < 0:
        return None
    depth = 0
    for i in range(opening, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[opening + 1:i]
    return None  # unbalanced braces: no answer
