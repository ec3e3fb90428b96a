"""HumanEval and MBPP: the pass@k estimator, loaders and prompts of the official formats, scoring through the sandbox,
and `llamakit eval --tasks humaneval,mbpp` end to end."""

import gzip
import json
import math
from pathlib import Path

import pytest

from llamakit.cli import main
from llamakit.errors import EvalError
from llamakit.eval.code import (
    TASKS,
    check_pass_k,
    code_sampling,
    generate_completions,
    load_humaneval,
    load_mbpp,
    pass_at_k,
    score_completions,
)
from llamakit.eval.math_tasks import Sampling
from llamakit.eval.sandbox import Limits

DATA = Path(__file__).parent / "data"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl"
MBPP = DATA / "mbpp" / "mbpp.jsonl"
LIMITS = Limits(timeout=5)


# pass@k ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (5, 1, 1, 0.2),  # pass@1 is the fraction correct
    (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
    (4, 2, 3, 1.0),  # n - c = 2 < k = 3: every 3 of the 4 hold a correct one
    (200, 190, 100, 1.0),
    (1000, 1, 100, 0.1),  # 1 - C(999,100)/C(1000,100) = 1 - 900/1000
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_ratio():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 where n - c < k
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_settings_that_cannot_give_pass_at_k_are_refused():
    with pytest.raises(EvalError, match="pass --samples 10 or more"):
        check_pass_k((1, 10), 1)
    with pytest.raises(EvalError, match="would all be the greedy completion"):
        code_sampling(5, 0.0, 0, (1,))
    assert code_sampling(0, 0.6, 3, (1,)) == Sampling(0, 0.6, 3)  # greedy: the temperature is unused
    assert code_sampling(10, 0.8, 3, (1, 10)) == Sampling(10, 0.8, 3)


# Loaders and prompts ------------------------------------------------------------------------------

def test_humaneval_prompt_and_program():
    problems = load_humaneval(HUMANEVAL)
    assert [p.id for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    first = problems[0]
    assert first.prompt == 'def add_one(x: int) -> int:\n    """ Return x plus one.\n    >>> add_one(1)\n    2\n    """\n'
    completion = "    return x + 1"
    assert first.program(completion) == (
        first.prompt + completion + "\n" + "\n\nMETADATA = {\n    'author': 'llamakit',\n    'dataset': 'test'\n}\n\n\n"
        "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"
        "    assert candidate(41) == 42\n" + "\n" + "check(add_one)\n")
    assert TASKS["humaneval"].stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def test_humaneval_reads_the_gzipped_release(tmp_path):
    packed = tmp_path / "HumanEval.jsonl.gz"
    packed.write_bytes(gzip.compress(HUMANEVAL.read_bytes()))
    assert load_humaneval(packed) == load_humaneval(HUMANEVAL)


def test_mbpp_prompt_is_the_published_three_shot_format():
    problems = load_mbpp(MBPP)
    assert [p.id for p in problems] == ["11", "12", "13"]  # the test split: task_id 11-510 (1 and 600 are not)
    expected = (
        "You are an expert Python programmer, and here is your task: Write a function to find the common elements "
        "of two tuples. Your code should pass these tests:\n\n"
        "assert common_elements((1, 2, 3), (2, 3, 4)) == (2, 3)\nassert common_elements((5, 6), (7, 8)) == ()\n"
        "assert common_elements((9, 1), (1, 9)) == (1, 9)\n[BEGIN]\n"
        "def common_elements(t1, t2):\r\n  res = tuple(sorted(set(t1) & set(t2)))\r\n  return (res) \n[DONE]\n\n"
        "You are an expert Python programmer, and here is your task: Write a python function to check whether a "
        "number is even. Your code should pass these tests:\n\n"
        "assert is_even(2) == True\nassert is_even(7) == False\nassert is_even(0) == True\n[BEGIN]\n"
        "def is_even(n):\r\n    return n % 2 == 0\n[DONE]\n\n"
        "You are an expert Python programmer, and here is your task: Write a function to find the n smallest "
        "numbers of a list using a heap. Your code should pass these tests:\n\n"
        "assert n_smallest([5, 1, 4, 2], 2) == [1, 2]\nassert n_smallest([3, 3, 1], 1) == [1]\n"
        "assert n_smallest([9, 8, 7], 3) == [7, 8, 9]\n[BEGIN]\n"
        "import heapq\r\ndef n_smallest(nums, n):\r\n  return heapq.nsmallest(n, nums)\n[DONE]\n\n"
        "You are an expert Python programmer, and here is your task: Write a python function to reverse a string. "
        "Your code should pass these tests:\n\n"
        'assert reverse_string("abc") == "cba"\nassert reverse_string("") == ""\nassert reverse_string("a b") == "b a"'
        "\n[BEGIN]\n")
    assert problems[0].prompt == expected
    assert TASKS["mbpp"].stop == ("[DONE]",)


def test_mbpp_program_runs_the_setup_code_then_the_asserts():
    problem = load_mbpp(MBPP)[1]
    assert problem.program("def exact_root(n):\n  return math.isqrt(n)") == (
        "def exact_root(n):\n  return math.isqrt(n)\nimport math\n"
        "assert exact_root(16) == 4\nassert exact_root(1) == 1\nassert exact_root(0) == 0\n")


def test_mbpp_needs_the_shot_problems(tmp_path):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines()]
    partial = tmp_path / "mbpp.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task_id"] != 3))
    with pytest.raises(EvalError, match=r"lacks the prompt problems \[3\]"):
        load_mbpp(partial)
    partial.write_text(json.dumps({**rows[0], "test_list": "assert True"}) + "\n")
    with pytest.raises(EvalError, match="mbpp.jsonl:1: field 'test_list' should be a non-empty list"):
        load_mbpp(partial)


# Scoring through the sandbox ------------------------------------------------------------------------

@pytest.mark.parametrize("name, path", [("humaneval", HUMANEVAL), ("mbpp", MBPP)])
def test_reference_solutions_pass_and_wrong_ones_fail(name, path):
    """A 'model' whose completions are the datasets' own solutions scores pass@1 = 1 through the same function."""
    problems = TASKS[name].load(path)
    metrics, records = score_completions(problems, [[p.reference] for p in problems], (1,), LIMITS, workers=2)
    assert metrics["pass@1"] == 1.0 and metrics["samples_passed"] == len(problems) == metrics["n"]
    assert all(r["passed"] == 1 and r["samples"][0]["outcome"] == "passed" for r in records)
    wrong = "    return None\n" if name == "humaneval" else "def nothing():\n  return None"
    metrics, records = score_completions(problems, [[wrong] for _ in problems], (1,), LIMITS, workers=2)
    assert metrics["pass@1"] == 0.0 and metrics["samples_passed"] == 0
    assert {s["outcome"] for r in records for s in r["samples"]} <= {"failed", "error"}


def test_pass_at_k_over_several_samples():
    problems = load_humaneval(HUMANEVAL)[:2]
    ref0, ref1 = (p.reference for p in problems)
    samples = [[ref0, "    return 0\n", ref0], ["    while True:\n        pass\n", "    return []\n", "    return x\n"]]
    metrics, records = score_completions(problems, samples, (1, 2), Limits(timeout=2.5), workers=2)
    assert [r["passed"] for r in records] == [2, 0]
    assert records[0]["pass@1"] == pytest.approx(2 / 3) and records[0]["pass@2"] == 1.0  # 1 - C(1,2)/C(3,2)
    assert metrics["pass@1"] == pytest.approx(1 / 3) and metrics["pass@2"] == pytest.approx(0.5)
    assert [s["outcome"] for s in records[1]["samples"]] == ["timeout", "failed", "error"]
    assert metrics["samples_timeout"] == 1 and metrics["samples_passed"] == 2 and metrics["samples_per_problem"] == 3


# With a model --------------------------------------------------------------------------------------

def test_sampled_completions_do_not_depend_on_the_batch(stories):
    model, tokenizer = stories
    problems = load_humaneval(HUMANEVAL)[:2]
    sampling = Sampling(2, 0.8, seed=5)
    one, cuts = generate_completions(model, tokenizer, TASKS["humaneval"], problems, 512, 1, sampling)
    many, _ = generate_completions(model, tokenizer, TASKS["humaneval"], problems, 512, 4, sampling)
    assert one == many and cuts == [0, 0] and len(one) == 2 and all(len(c) == 2 for c in one)
    assert one[0][0] != one[0][1]  # two samples, not one repeated
    for text in (t for texts in one for t in texts):
        assert not any(stop in text for stop in TASKS["humaneval"].stop)


@pytest.fixture(scope="module")
def model_args(assets):
    tiny = assets / "tinyllamas"
    return ["--checkpoint", str(tiny / "stories260K.bin"), "--tokenizer", str(tiny / "tok512.model"), "--no-progress"]


def test_end_to_end_cli(model_args, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main(["eval", *model_args, "--tasks", "humaneval,mbpp", "--data-dir", str(DATA), "--output", str(output),
                 "--samples", "2", "--pass-k", "1,2", "--temperature", "0.8", "--workers", "2", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for task in ("humaneval", "mbpp"):
        for metric in ("pass@1", "pass@2"):
            assert any(line.split()[:2] == [task, metric] for line in out.splitlines()), (task, metric, out)
    data = json.loads(output.read_text())
    assert data["status"] == "complete"
    for task, n in (("humaneval", 3), ("mbpp", 3)):
        result = data["results"][task]
        records, metrics = result["examples"], result["metrics"]
        assert len(records) == n == metrics["n"] and metrics["samples_per_problem"] == 2
        assert all(len(r["samples"]) == 2 and r["passed"] == sum(s["outcome"] == "passed" for s in r["samples"])
                   for r in records)
        assert metrics["pass@1"] == pytest.approx(sum(r["passed"] / 2 for r in records) / n)
        settings = result["settings"]
        assert settings["template_version"] == "1" and settings["temperature"] == 0.8 and settings["top_p"] == 0.95
        assert settings["pass_k"] == [1, 2] and settings["sandbox_limits"]["timeout"] == 5
    assert data["results"]["mbpp"]["settings"]["n_shot"] == 3


def test_cli_refuses_pass_at_k_beyond_the_samples(model_args, capsys):
    code = main(["eval", *model_args, "--tasks", "mbpp", "--data-dir", str(DATA), "--pass-k", "1,10"])
    err = capsys.readouterr().err
    assert code == 1 and "pass@10 needs at least 10 samples per problem" in err and err.count("\n") == 1
