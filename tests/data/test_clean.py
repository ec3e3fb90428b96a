"""Cleaning: normalisation, CCNet-style boilerplate lines, Gopher/C4-style quality filters, langid."""

from pathlib import Path

import pytest

import llamakit.data.dedup
from llamakit.data.clean import (
    FilterConfig,
    LanguageFilter,
    alnum_fraction,
    duplicate_line_fraction,
    line_key,
    normalize_text,
    quality_issue,
    remove_boilerplate,
    top_ngram_fraction,
)
from tests.data.corpus import prose

BOILERPLATE = "Subscribe to our newsletter for 12 great stories every week!"
CODE = Path(llamakit.data.dedup.__file__).read_text()  # real source code must pass every default filter


def test_normalize_text():
    assert normalize_text("Cafe\u0301 ok  \r\nnext\rline\x00\x07\n\n\n\n\nend\t \n") == "Café ok\nnext\nline\n\nend"
    assert normalize_text("Cafe\u0301", nfc=False) == "Cafe\u0301"
    assert normalize_text("    indented code\n\tstays") == "    indented code\n\tstays"


def test_line_key_ignores_case_digits_and_spacing():
    assert line_key("  Page 12 of  30 ") == line_key("page 75 of 99") == "page 00 of 00"


def test_boilerplate_lines_dropped_from_all_but_the_first_document_unique_lines_kept():
    docs = [f"{prose(30, i)}\n{BOILERPLATE.replace('12', str(10 + i))}\n}}\n{prose(20, 100 + i)}" for i in range(12)]
    docs.append(prose(40, 999))
    cleaned, stats = remove_boilerplate(docs, min_docs=10, min_chars=30)
    assert stats.distinct_lines == 1 and stats.lines_dropped == 11
    assert stats.chars_dropped == 11 * (len(BOILERPLATE) + 1)
    assert cleaned[0] == docs[0]  # the first document holding the line keeps it
    for i, doc in enumerate(cleaned[1:12], start=1):
        assert doc == f"{prose(30, i)}\n}}\n{prose(20, 100 + i)}"  # short lines such as "}" are never dropped
    assert cleaned[12] == docs[12]


def test_near_copies_keep_their_text_once():
    shared = [prose(40, line) for line in range(5)]
    copies = ["\n".join([*shared, f"Copy {i}."]) for i in range(50)]  # a short line: never boilerplate
    cleaned, stats = remove_boilerplate(copies, min_docs=10, min_chars=30)
    assert cleaned[0] == copies[0] and stats.lines_dropped == 49 * 5
    assert cleaned[1:] == [f"Copy {i}." for i in range(1, 50)]  # then too short for the quality filters


def test_boilerplate_threshold_and_switch():
    docs = [f"{prose(20, i)}\n{BOILERPLATE}" for i in range(9)]
    assert remove_boilerplate(docs, min_docs=10, min_chars=30)[0] == docs  # in 9 documents: below K=10
    assert remove_boilerplate(docs, min_docs=9, min_chars=30)[1].lines_dropped == 8
    assert remove_boilerplate(docs, min_docs=0, min_chars=30)[0] == docs
    repeated_in_one = [f"{BOILERPLATE}\n" * 20 + prose(20, 1)]  # counts documents, not occurrences
    assert remove_boilerplate(repeated_in_one, min_docs=2, min_chars=30)[1].lines_dropped == 0
    copies = [f"{prose(20, 100)}\n{BOILERPLATE}"] * 50 + docs  # copies of a document count once: 10 distinct
    cleaned, stats = remove_boilerplate(copies, min_docs=11, min_chars=30)
    assert cleaned == copies and stats.lines_dropped == 0
    assert remove_boilerplate(copies, min_docs=10, min_chars=30)[1].lines_dropped == 58  # all but the first


GOOD = {
    "prose": prose(300, 1),
    "code": CODE,
    "short prose": "A short but perfectly fine sentence.",
}
BAD = {  # text -> the filter that must remove it (defaults, or the given settings)
    "min_chars": ("Hi.", {}),
    "max_chars": (prose(200, 2), {"max_chars": 500}),
    "min_words": ("only four words here", {"min_words": 5}),
    "max_words": (prose(200, 3), {"max_words": 100}),
    "min_alnum_fraction": ("=-=-=-=-=-=-=-=-=-= ***** ##### ~~~~~ ..... ;;;;", {}),
    "max_duplicate_line_fraction": ("\n".join(["Buy cheap watches online today."] * 8 + [prose(20, 4)]), {}),
    "max_top_ngram_fraction": (" ".join(["click here"] * 40) + " " + prose(30, 5), {}),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_defaults_keep_normal_prose_and_code(name):
    assert quality_issue(GOOD[name], FilterConfig()) is None


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_filter_removes_its_case(name):
    text, settings = BAD[name]
    assert quality_issue(text, FilterConfig(**settings)) == name
    off = {"min_chars": None, "max_chars": None, "min_words": None, "max_words": None, "min_alnum_fraction": None,
           "max_duplicate_line_fraction": None, "max_top_ngram_fraction": None}
    assert quality_issue(text, FilterConfig(**off)) is None  # None turns each one off


def test_measures():
    assert alnum_fraction("ab !!") == 0.5 and alnum_fraction("   ") == 1.0
    assert duplicate_line_fraction("abc\nabc\n\nxy\n") == pytest.approx(3 / 8)
    words = ["a", "b", "a", "b", "a", "b", "c"]
    assert top_ngram_fraction(words, 2) == pytest.approx(3 * 2 / 7)  # "a b" occurs 3 times
    assert top_ngram_fraction(["a", "b", "c", "d"], 2) == 0.0


def test_language_filter():
    english = "The quick brown fox jumps over the lazy dog, and then it runs back home to sleep."
    french = "Le renard brun saute par-dessus le chien paresseux, puis il rentre chez lui pour dormir."
    keep_english = LanguageFilter(["en"], 0.5)
    assert keep_english.keeps(english) and not keep_english.keeps(french)
    assert keep_english.classify(french)[0] == "fr"
    assert LanguageFilter(["en", "fr"], 0.5).keeps(french)
    assert not LanguageFilter(["en"], 1.01).keeps(english)  # a score it cannot reach
