"""GSM8K and MATH: prompts equal lm-evaluation-harness's, answers are read and normalised as published, maj@k votes."""

import ast
import json
import re
from pathlib import Path

import pytest

from llamakit.cli import main
from llamakit.errors import EvalError
from llamakit.eval import math_tasks
from llamakit.eval.math_prompts import MINERVA_SHOTS
from llamakit.eval.math_tasks import (
    Sampling,
    extract_gsm8k,
    extract_math,
    gsm8k_prompt,
    load_gsm8k,
    load_math,
    majority_vote,
    math_prompt,
    score_math,
)
from llamakit.eval.minerva import last_boxed, normalize_final_answer
from llamakit.eval.scoring import greedy_answers
from llamakit.generate import SamplingParams
from tests.eval.lm_eval_tasks import gsm8k_rows, lm_eval_requests

DATA = Path(__file__).parent / "data"


def test_gsm8k_prompt_equals_lm_eval_gsm8k_cot():
    requests, _ = lm_eval_requests("gsm8k_cot")  # lm-eval's own task over our fixture rows
    rows = gsm8k_rows()
    assert len(requests) == len(rows) == 3
    for row, [(context, generation)] in zip(rows, requests):
        assert gsm8k_prompt(row["question"]) == context
        assert "Q:" in generation["until"]
    assert gsm8k_prompt("Why?", 1) == ("Q: There are 15 trees in the grove. Grove workers will plant trees in the grove "
                                       "today. After they are done, there will be 21 trees. How many trees did the grove "
                                       "workers plant today?\nA: There are 15 trees originally. Then there were 21 trees "
                                       "after some more were planted. So there must have been 21 - 15 = 6. The answer is "
                                       "6.\n\nQ: Why?\nA:")
    assert gsm8k_prompt("Why?", 0) == "Q: Why?\nA:"


def lm_eval_minerva() -> dict:
    """The pure functions and lists of lm-eval's minerva_math/utils.py, taken from its source without importing it
    (the module refuses to import without math_verify and antlr4)."""
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    source = (Path(lm_eval.tasks.__file__).parent / "minerva_math" / "utils.py").read_text()
    wanted = {"SUBSTITUTIONS", "REMOVED_EXPRESSIONS", "normalize_final_answer", "list_fewshot_samples", "doc_to_text",
              "last_boxed_only_string", "remove_boxed", "get_unnormalized_answer"}
    nodes = [n for n in ast.parse(source).body if getattr(n, "name", None) in wanted
             or (isinstance(n, ast.Assign) and n.targets[0].id in wanted)]
    namespace = {"re": re}
    exec(compile(ast.Module(nodes, []), "minerva_utils", "exec"), namespace)  # noqa: S102
    return namespace


def test_math_prompt_is_minervas_as_lm_eval_builds_it():
    reference = lm_eval_minerva()
    shots = reference["list_fewshot_samples"]()
    assert tuple((s["problem"], s["solution"]) for s in shots) == MINERVA_SHOTS
    # lm-eval: doc_to_text, the target after a space, documents joined by a blank line (its default delimiters)
    expected = "".join(reference["doc_to_text"](s) + " " + s["solution"] + "\n\n" for s in shots)
    assert math_prompt("What is $1+1$?") == expected + "Problem:\nWhat is $1+1$?\n\nSolution:"
    assert math_prompt("Why?", 0) == "Problem:\nWhy?\n\nSolution:"


@pytest.mark.parametrize("text, answer, found_by", [
    ("So he has 18 apples. The answer is 18.", "18", "answer phrase"),
    ("The answer is $1,000.", "1000", "answer phrase"),
    ("The answer is 2.5. The answer is 7.", "2.5", "answer phrase"),  # the first one
    ("He lost 3. The answer is -3", "-3", "answer phrase"),
    ("5 + 4 = 9 toys.", "9", "last number"),
    ("It costs $1,200.50 in total.", "1200.50", "last number"),
    ("Once upon a time.", None, "none"),
])
def test_gsm8k_answers(text, answer, found_by):
    assert extract_gsm8k(text) == math_tasks.Answer(answer, found_by)


@pytest.mark.parametrize("given, expected", [
    ("\\frac12", "\\frac{1}{2}"),  # shorthand braced
    ("\\fracab", "\\frac{a}{b}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("10,000", "10000"),  # thousands separators of an integer go
    ("(1, 2)", "(1,2)"),  # a tuple keeps its comma
    ("\\text{5 inches}", "5"),  # units and \text{} go
    ("5 \\text{ cm}^2", "5"),
    ("90^\\circ", "90"),
    ("$x = 5$", "5"),  # the right side of the last '='
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\$18.90", "18.90"),
    ("\\text{(B)}", "(B)"),
    ("\\textbf{east}", "east"),
    ("x^2+7x+10", "x^2+7x+10"),
])
def test_minerva_normalisation(given, expected):
    assert normalize_final_answer(given) == expected


def test_minerva_normalisation_keeps_the_published_quirks():
    # Appendix D removes unit names as substrings: "\left" loses its "ft" (newer lm-eval versions fix this; we keep
    # the published function so that scores compare with published ones; both sides lose it alike)
    assert normalize_final_answer("\\left(1,2\\right)") == "\\le(1,2\\right)"
    assert normalize_final_answer("pizza slices") == "pizzslices"  # "a " is dropped wherever it ends a word


def test_minerva_normalisation_agrees_with_lm_eval_where_it_did_not_change_it():
    reference = lm_eval_minerva()["normalize_final_answer"]
    for given in ("\\frac12", "\\sqrt2", "10,000", "\\text{5 inches}", "5 \\text{ cm}^2", "90^\\circ", "$x = 5$",
                  "\\boxed{\\frac{1}{2}}", "\\$18.90", "\\text{(B)}", "x^2+7x+10", "-\\frac{2}{3}", "[2,5)"):
        assert normalize_final_answer(given) == reference(given), given


def test_boxed_answers_and_extraction():
    reference = lm_eval_minerva()
    for solution in ["so $x = \\boxed{\\frac{1}{2}}$.", "first \\boxed{1}, then \\boxed{2^{3}}", "\\boxed 5$ ok",
                     MINERVA_SHOTS[3][1]]:
        assert last_boxed(solution) == reference["remove_boxed"](reference["last_boxed_only_string"](solution))
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("no box") is None and last_boxed("\\boxed{1") is None
    outputs = {" We get $x=4$.\nFinal Answer: The final answer is $4$. I hope it is correct.": "4",
               " Final Answer: The final answer is $\\frac12$. ": "\\frac{1}{2}",  # cut off: lm-eval completes it
               " Final Answer: The final answer is $\\frac12$.": None,  # no space before the (added) closing sentence
               " Final Answer: The final answer is 10,000 dollars. I hope it is correct.": "10000"}
    for output, answer in outputs.items():
        unnormalised = reference["get_unnormalized_answer"](output)
        assert (None if unnormalised == "[invalidanswer]" else normalize_final_answer(unnormalised)) == answer
        assert extract_math(output) == math_tasks.Answer(answer, "answer phrase" if answer else "none")
    assert extract_math(" Hence $\\boxed{24 \\text{ inches}}$") == math_tasks.Answer("24", "last boxed")


def test_majority_vote():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # a tie: the first seen
    assert majority_vote(["3", "4", "4"]) == "4"
    assert majority_vote([None, "5", None]) == "5" and majority_vote([None, None]) is None


def test_maj_at_k_on_constructed_samples(monkeypatch):
    problems = load_gsm8k(DATA / "gsm8k" / "test.jsonl")[:2]  # gold 7 and 1000
    samples = ["The answer is 8.", "The answer is 7.", "The answer is 7.", "no idea",
               "The answer is 3.", "The answer is 1,000.", "x", "The answer is 3."]
    calls = []

    def generated(model, tokenizer, prompts, window, max_new_tokens, stop, batch_size, progress, desc, params=None):
        calls.append((list(prompts), params))
        texts = samples if params else ["The answer is 7.", "I do not know"]
        return [(t, 0) for t in texts]

    monkeypatch.setattr(math_tasks, "greedy_answers", generated)
    result = score_math(None, None, math_tasks.TASKS["gsm8k"], DATA / "gsm8k" / "test.jsonl", problems, 512, 4, 8,
                        Sampling(samples=4, temperature=0.7, seed=3))
    assert result.metrics["em"] == 0.5 and result.metrics["maj@k"] == 0.5 and result.metrics["k"] == 4
    assert result.metrics["sample_em"] == pytest.approx((2 / 4 + 1 / 4) / 2) and result.metrics["no_answer"] == 1
    first, second = result.records
    assert first["samples"] == ["8", "7", "7", None] and first["majority"] == "7" and first["maj_em"] == 1
    assert second["samples"] == ["3", "1000", None, "3"] and second["majority"] == "3" and second["maj_em"] == 0
    assert second["answer"] is None and second["found_by"] == "none"  # "I do not know": no number
    prompts, params = calls[1]
    assert prompts == [calls[0][0][0]] * 4 + [calls[0][0][1]] * 4  # k copies of each prompt, in order
    assert len({p.seed for p in params}) == 8 and {(p.temperature, p.top_p) for p in params} == {(0.7, 1.0)}
    assert result.settings["samples"] == 4 and result.settings["sampling_seed"] == 3


def test_sampled_answers_do_not_depend_on_batching(stories, one_thread):
    model, tokenizer = stories
    prompts = ["Once upon a time", "Tom had a dog", "Once upon a time"]
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=math_tasks.sample_seed(0, i, 0)) for i in range(3)]
    alone = greedy_answers(model, tokenizer, prompts, 512, 24, ("\n",), 1, params=params)
    together = greedy_answers(model, tokenizer, prompts, 512, 24, ("\n",), 3, params=params)
    assert alone == together
    assert alone[0] != alone[2]  # the same prompt under another seed
    assert greedy_answers(model, tokenizer, prompts[:1], 512, 24, ("\n",), 1) == \
        greedy_answers(model, tokenizer, prompts[:1], 512, 24, ("\n",), 1, params=[SamplingParams(temperature=0)])


def test_math_loaders(tmp_path):
    problems = load_math(DATA / "math" / "test")
    assert [(p.id, p.gold, p.subject, p.level) for p in problems] == [
        ("algebra/1", "5", "Algebra", "Level 1"), ("algebra/2", "\\frac{1}{2}", "Algebra", "Level 1"),
        ("number_theory/1", "24", "Number Theory", "Level 2")]
    rows = tmp_path / "math500.jsonl"  # HuggingFaceH4/MATH-500's rows
    rows.write_text(json.dumps({"problem": "p", "solution": "so \\boxed{3}", "answer": "3", "subject": "Algebra",
                                "level": 1, "unique_id": "test/algebra/1.json"}) + "\n")
    assert load_math(rows) == [math_tasks.Problem("test/algebra/1.json", "p", "3", "Algebra", "1")]
    assert [p.gold for p in load_gsm8k(DATA / "gsm8k" / "test.jsonl")] == ["7", "1000", "30"]


@pytest.mark.parametrize("loader, text, message", [
    (load_gsm8k, {"question": "q", "answer": "it is 5"}, r"g.jsonl:1: the answer has no '#### N' final line"),
    (load_gsm8k, {"question": "q", "answer": "#### "}, r"nothing after '####'"),
    (load_gsm8k, {"question": "q"}, r"missing field 'answer'"),
    (load_math, {"problem": "p", "solution": "it is 5"}, r"g.jsonl:1: the solution has no \\boxed\{\} answer"),
    (load_math, {"solution": "\\boxed{1}"}, r"missing field 'problem'"),
])
def test_malformed_rows_are_refused(tmp_path, loader, text, message):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(text) + "\n")
    with pytest.raises(EvalError, match=message):
        loader(path)


def test_malformed_math_folder(tmp_path):
    with pytest.raises(EvalError, match="no <subject>/<n>.json files"):
        load_math(tmp_path)
    (tmp_path / "algebra").mkdir()
    (tmp_path / "algebra" / "1.json").write_text("{\"problem\": ")
    with pytest.raises(EvalError, match=r"1.json: not valid JSON"):
        load_math(tmp_path)
    (tmp_path / "mixed" / "MATH" / "train" / "algebra").mkdir(parents=True)
    (tmp_path / "mixed" / "MATH" / "train" / "algebra" / "1.json").write_text((DATA / "math/test/algebra/1.json").read_text())
    with pytest.raises(EvalError, match="holds training problems"):
        load_math(tmp_path / "mixed" / "MATH")


def test_end_to_end_cli(assets, capsys, tmp_path, one_thread):
    tiny = assets / "tinyllamas"
    output = tmp_path / "results.json"
    args = ["eval", "--checkpoint", tiny / "stories260K.bin", "--tokenizer", tiny / "tok512.model", "--no-progress",
            "--data-dir", DATA, "--limit", "2"]
    code = main([str(a) for a in args + ["--tasks", "gsm8k,math,race", "--samples", "2", "--output", output]])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert {("gsm8k", "em"), ("gsm8k", "maj@k"), ("math", "em"), ("math", "maj@k"), ("race", "acc")} <= rows
    data = json.loads(output.read_text())
    assert data["status"] == "complete" and list(data["results"]) == ["gsm8k", "math", "race"]
    gsm8k, math, race = (data["results"][t] for t in ("gsm8k", "math", "race"))
    assert set(gsm8k["metrics"]) >= {"em", "em_stderr", "maj@k", "k", "sample_em", "n", "no_answer"}
    assert gsm8k["metrics"]["n"] == 2 and gsm8k["metrics"]["k"] == 2 and gsm8k["settings"]["n_shot"] == 8
    assert gsm8k["settings"]["template_version"] == "1" and "The answer is" in gsm8k["settings"]["normalisation"]
    assert math["settings"]["n_shot"] == 4 and len(math["examples"][0]["samples"]) == 2
    assert math["metrics"]["em"] == sum(r["em"] for r in math["examples"]) / 2
    assert race["metrics"]["n"] == 2 and race["settings"]["template_version"] == "1" and "level" in race["examples"][0]
    code = main([str(a) for a in args + ["--tasks", "math", "--num-fewshot", "5"]])
    assert code == 1 and "math has 4 published exemplars" in capsys.readouterr().err
