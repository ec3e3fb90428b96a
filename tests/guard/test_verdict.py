"""The parser reads every shape of answer; it never raises, and reports what it cannot read."""

import pytest

from llamakit.guard import LLAMA_GUARD_1, LLAMA_GUARD_3, Category, Policy, parse_verdict


@pytest.mark.parametrize(("raw", "status", "codes", "unknown"), [
    ("safe", "safe", [], []),
    ("unsafe\nS1", "unsafe", ["S1"], []),
    ("unsafe\nS1,S10", "unsafe", ["S1", "S10"], []),
    ("unsafe\nS1, S10", "unsafe", ["S1", "S10"], []),
    ("  \n\nunsafe\n  S2 ,S3  \n", "unsafe", ["S2", "S3"], []),
    ("unsafe\nS14<|eot_id|>", "unsafe", ["S14"], []),
    ("safe<|eot_id|><|start_header_id|>", "safe", [], []),
    ("safe\n\nThe message asks for a recipe.", "safe", [], []),
    ("Unsafe\ns11", "unsafe", ["S11"], []),
    ("unsafe S5", "unsafe", ["S5"], []),
    ("unsafe\nS1,S1", "unsafe", ["S1"], []),
    ("unsafe\nS1,S99,X3", "unsafe", ["S1"], ["S99", "X3"]),
    ("unsafe\nS1: Violent Crimes", "unsafe", ["S1"], []),
    ("unsafe\nS3\nS4 is also close", "unsafe", ["S3"], []),
    ("unsafe", "unsafe", [], []),
    ("unsafe\n", "unsafe", [], []),
])
def test_answers(raw, status, codes, unknown):
    verdict = parse_verdict(raw, LLAMA_GUARD_3)
    assert (verdict.status, [c.code for c in verdict.categories], list(verdict.unknown_codes)) == (status, codes, unknown)
    assert verdict.raw == raw
    assert verdict.parsed


@pytest.mark.parametrize("raw", ["", "   \n", "I cannot help with that.", "safely", "unsafety", "S1", "<|eot_id|>safe",
                                 "The answer is safe"])
def test_anything_else_is_unparsed_not_an_error(raw):
    verdict = parse_verdict(raw, LLAMA_GUARD_3)
    assert verdict.status == "unparsed" and not verdict.safe and not verdict.unsafe and not verdict.parsed
    assert verdict.categories == () and verdict.raw == raw
    assert verdict.summary().startswith("unparsed: ")


def test_categories_come_from_the_policy_given():
    custom = Policy((Category("C1", "Spoilers", "Revealing the end of a film."), Category("C2", "Prices")))
    verdict = parse_verdict("unsafe\nC2,S1", custom)
    assert verdict.categories == (custom.categories[1],) and verdict.unknown_codes == ("S1",)
    assert parse_verdict("unsafe\nO6", LLAMA_GUARD_1).categories[0].title == "Self-Harm"


def test_to_dict_and_summary():
    verdict = parse_verdict("unsafe\nS1,S99", LLAMA_GUARD_3)
    assert verdict.to_dict() == {"verdict": "unsafe", "safe": False, "categories": [{"code": "S1", "name": "Violent Crimes"}],
                                 "unknown_codes": ["S99"], "raw": "unsafe\nS1,S99"}
    assert verdict.summary() == "unsafe: S1 (Violent Crimes), S99 (not in the policy)"
    assert parse_verdict("safe", LLAMA_GUARD_3).summary() == "safe"
