"""Task loaders read the official formats (written here as small fixture files) and name the file and line of a bad row."""

import json

import pytest

from llamakit.errors import EvalError
from llamakit.eval.tasks import (
    hellaswag_preprocess,
    load_arc,
    load_boolq,
    load_hellaswag,
    load_openbookqa,
    load_piqa,
    load_siqa,
    load_winogrande,
)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROOF = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                    "starts pulling up roofing on a roof."], "label": 3, "split": "val"}
FASHION = {"ind": 9999, "activity_label": "Personal Care and Style", "ctx_b": "", "label": 0, "ctx_a":
           "[header] How to become a fashion consultant [title] Obtain your high school diploma or ged. [step] This "
           "job requires a high school diploma or equivalent, so make sure to apply yourself and finish school. "
           "[substeps] If your high school offers these classes, take art, design, and sewing to familiarize "
           "yourself with foundational concepts in fashion.", "endings": ["a", "b", "c", "d"]}


def test_hellaswag_preprocessing_rules():
    assert hellaswag_preprocess(" Baking: [header] How to bake [title] Mix flour. [step] Add  water. ") == \
        "Baking: How to bake. Mix flour. Add water."
    assert hellaswag_preprocess("a   b") == "a  b"  # one pass, as published


def test_hellaswag_jsonl_matches_the_text_form(assets, tmp_path):
    text_form = load_hellaswag(assets / "eval" / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(text_form) == 10042
    fashion_text = next(e for e in text_form if e.choices[0][0].startswith("Personal Care and Style: How to become"))
    roof, fashion = load_hellaswag(jsonl(tmp_path / "hellaswag_val.jsonl", [ROOF, FASHION]))
    # WikiHow markers: the published clean-up gives exactly the text form's line
    assert fashion.choices[0][0] == fashion_text.choices[0][0]
    # the text form (llama.cpp's) keeps ctx_b as written; the published JSONL rule capitalises it
    assert roof.choices == tuple((c.replace("roof. he", "roof. He"), e) for c, e in text_form[0].choices)
    assert roof.gold == text_form[0].gold == 3 and roof.choices[3][1] == " starts pulling up roofing on a roof."


def test_hellaswag_malformed(tmp_path):
    bad = tmp_path / "h.txt"
    bad.write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(EvalError, match=r"h.txt:2: label 7"):
        load_hellaswag(bad)
    bad.write_text("ctx\n1\na\n")
    with pytest.raises(EvalError, match="not a multiple of 6"):
        load_hellaswag(bad)
    with pytest.raises(EvalError, match=r"h.jsonl:2: missing field 'endings'"):
        load_hellaswag(jsonl(tmp_path / "h.jsonl", [ROOF, {k: v for k, v in ROOF.items() if k != "endings"}]))


def test_piqa_real_file(assets):
    examples = load_piqa(assets / "eval" / "piqa" / "valid.jsonl")
    assert len(examples) == 1838 and examples[0].gold == 0 and examples[1].gold == 1
    context, continuation = examples[0].choices[0]
    assert context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert continuation.startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped p")


def test_piqa_and_siqa_labels(tmp_path):
    piqa = jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    with pytest.raises(EvalError, match="no labels file"):
        load_piqa(piqa)
    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(EvalError, match="1 labels for 2 examples"):
        load_piqa(piqa)
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    assert [e.gold for e in load_piqa(piqa)] == [1, 0]
    siqa = jsonl(tmp_path / "dev.jsonl", [{"context": "Tracy went home.", "question": "Why?", "answerA": "tired",
                                          "answerB": "bored", "answerC": "hungry"}])
    (tmp_path / "dev-labels.lst").write_text("3\n")
    [example] = load_siqa(siqa)
    assert example.gold == 2 and example.choices[0] == ("Q: Tracy went home. Why?\nA:", " tired")
    (tmp_path / "dev-labels.lst").write_text("4\n")
    with pytest.raises(EvalError, match=r"dev-labels.lst:1: label '4'"):
        load_siqa(siqa)


AI2 = {"id": "Mercury_1", "question": {"stem": "Which is a gas?", "choices": [
    {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}]}, "answerKey": "B"}


def test_arc_and_openbookqa(tmp_path):
    [arc] = load_arc(jsonl(tmp_path / "ARC-Easy-Test.jsonl", [AI2]))
    assert arc.gold == 1 and arc.choices[1] == ("Question: Which is a gas?\nAnswer:", " steam") and arc.id == "Mercury_1"
    assert arc.answers == ("ice", "steam", "rock")  # lm-eval's choices: acc_norm divides by their lengths
    [obqa] = load_openbookqa(jsonl(tmp_path / "test.jsonl", [AI2]))
    assert obqa.choices[2] == ("Which is a gas?", " rock")
    with pytest.raises(EvalError, match=r"test.jsonl:2: answerKey 'E' is not one of"):
        load_openbookqa(jsonl(tmp_path / "test.jsonl", [AI2, {**AI2, "answerKey": "E"}]))


def test_boolq(tmp_path):
    row = {"question": "is water wet", "title": "Water", "answer": True, "passage": "Water is a liquid."}
    [example] = load_boolq(jsonl(tmp_path / "dev.jsonl", [row]))
    assert example.gold == 1
    assert example.choices == (("Water is a liquid.\nQuestion: is water wet?\nAnswer:", " no"),
                               ("Water is a liquid.\nQuestion: is water wet?\nAnswer:", " yes"))
    assert example.answers == ("no", "yes")
    with pytest.raises(EvalError, match=r"dev.jsonl:1: field 'answer' should be a non-empty bool"):
        load_boolq(jsonl(tmp_path / "dev.jsonl", [{**row, "answer": "yes"}]))


def test_winogrande_partial_scoring(tmp_path):
    row = {"qID": "q1", "sentence": "The trophy didn't fit in the suitcase because the _ was too big.",
           "option1": "trophy", "option2": "suitcase", "answer": "1"}
    [example] = load_winogrande(jsonl(tmp_path / "dev.jsonl", [row]))
    assert example.gold == 0
    assert example.choices == (("The trophy didn't fit in the suitcase because the trophy", " was too big."),
                               ("The trophy didn't fit in the suitcase because the suitcase", " was too big."))
    with pytest.raises(EvalError, match="exactly one '_'"):
        load_winogrande(jsonl(tmp_path / "dev.jsonl", [{**row, "sentence": "no blank"}]))


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "answer": false}\n{not json\n')
    with pytest.raises(EvalError, match=r"dev.jsonl:2: not valid JSON"):
        load_boolq(bad)
    with pytest.raises(EvalError, match="does not exist"):
        load_arc(tmp_path / "nope.jsonl")
