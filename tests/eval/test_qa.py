"""Closed-book QA: SQuAD normalisation, exact match against aliases, the paper's prompt, greedy answers vs transformers."""

import json

import pytest
import torch

from llamakit.errors import EvalError
from llamakit.eval import evaluate_qa, exact_match, normalize_answer
from llamakit.eval.qa import load_qa, qa_prompt


@pytest.mark.parametrize("text, expected", [
    ("The Beatles", "beatles"),
    ("  Charles   Darwin. ", "charles darwin"),
    ("an apple, a pear & the fig!", "apple pear fig"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" inside a word stays
    ("U.S.A.", "usa"),
    ("A", ""),
    ("Ça va—bien", "ça va—bien"),  # only ASCII punctuation is removed, as in SQuAD
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_any_alias():
    assert exact_match("the Frank Sinatra.", ["Sinatra", "Frank Sinatra"])
    assert not exact_match("Frank", ["Frank Sinatra"])
    assert not exact_match("", ["x"]) and exact_match("", ["a"])  # "a" normalises to nothing


def test_paper_prompt():
    assert qa_prompt("Who wrote the book the origin of species?") == (
        "Answer these questions:\nQ: Who sang who wants to be a millionaire in high society?\nA: Frank Sinatra\n"
        "Q: Who wrote the book the origin of species?\nA:")
    assert qa_prompt(" Who? ", n_shot=0) == "Answer these questions:\nQ: Who?\nA:"


def test_loaders_accept_nq_open_and_triviaqa_rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "who is tom", "answer": ["Tom", "Thomas"]}) + "\n" +
                    json.dumps({"question": "q2", "answers": "one"}) + "\n" +
                    json.dumps({"Question": "q3", "QuestionId": "tqa1", "Answer": {"Value": "V", "Aliases": ["v1"]}})
                    + "\n")
    rows = load_qa(path)
    assert [r.answers for r in rows] == [("Tom", "Thomas"), ("one",), ("V", "v1")] and rows[2].id == "tqa1"
    path.write_text(json.dumps({"question": "q", "answer": []}) + "\n")
    with pytest.raises(EvalError, match=r"qa.jsonl:1: no answers"):
        load_qa(path)


def test_greedy_answers_equal_transformers_and_are_scored(stories, stories_hf, tmp_path):
    model, tokenizer = stories
    questions = [("Where did Lily go?", ["the park"]), ("What did Tom see?", ["a big dog", "dog"]),
                 ("Who was happy?", ["Lily"])]
    path = tmp_path / "nq.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in questions))
    result = evaluate_qa(model, tokenizer, "nq", path, window=512, batch_size=2)
    for (question, answers), record in zip(questions, result.records):
        ids = tokenizer.encode(qa_prompt(question), bos=True)
        with torch.no_grad():
            out = stories_hf[0].generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                         eos_token_id=tokenizer.eos_id, pad_token_id=0)[0, len(ids):]
        expected = tokenizer.decode(out.tolist()).split("\n")[0].strip()
        assert record["prediction"] == expected
        assert record["em"] == int(exact_match(expected, answers))
    assert result.metrics["em"] == sum(r["em"] for r in result.records) / 3
    assert result.settings["n_shot"] == 1 and result.settings["template_version"] == "1"
    with pytest.raises(EvalError, match="must be 0 or 1"):
        evaluate_qa(model, tokenizer, "nq", path, window=512, batch_size=2, n_shot=3)
