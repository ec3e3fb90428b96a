"""Code generation: HumanEval and MBPP, scored by running the unit tests in the sandbox (pass@k).

HumanEval (version 1), Chen et al. 2021, zero-shot: the model continues the problem's `prompt` (signature
and docstring) as it is in HumanEval.jsonl, up to "\\nclass", "\\ndef", "\\n#", "\\nif" or "\\nprint" (the
Codex paper's stops); the program run is prompt + completion + "\\n" + test + "\\n" + "check(entry_point)".
(lm-evaluation-harness's `humaneval` appends an instruction and a ```python fence to the prompt instead;
bigcode-evaluation-harness's `humaneval` strips the prompt's trailing newline: numbers differ slightly.)

MBPP (version 1), Austin et al. 2021, 3-shot as in the MBPP and LLaMA papers and lm-eval's `mbpp`: the
problems of the prompt split with task_id 2, 3, 4 are the shots, the test split is task_id 11-510. Each
shot is "You are an expert Python programmer, and here is your task: {text} Your code should pass these
tests:\\n\\n{test_list joined by \\n}\\n[BEGIN]\\n{code}\\n[DONE]"; shots and the question are joined by a
blank line, and the question ends at "[BEGIN]\\n". Generation stops at "[DONE]"; the program run is the
completion + "\\n" + test_setup_code + "\\n" + the test_list asserts. Shot code is used as in the file
(its \\r\\n line ends included, as lm-eval does).

pass@k is the unbiased estimator of Chen et al. 2021 from n samples per problem of which c pass:
1 - C(n-c, k) / C(n, k), averaged over problems. Without --samples, one greedy completion per problem
gives pass@1; with --samples n, n completions are sampled (temperature, top-p 0.95 as in the Codex
paper), each from its own seed so the text does not depend on batching.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.math_tasks import Sampling, sample_seed
from llamakit.eval.multiple_choice import TaskResult
from llamakit.eval.readers import field, read_jsonl, sha256_of
from llamakit.eval.sandbox import OUTCOMES, Limits, describe, run_programs
from llamakit.eval.scoring import greedy_answers
from llamakit.generate import SamplingParams
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

MAX_NEW_TOKENS = 512  # at most half the window, so that a prompt has room
TOP_P = 0.95  # the Codex paper's nucleus for sampled completions
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_INSTRUCTION = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:"
MBPP_SHOT_IDS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


@dataclass(frozen=True)
class CodeProblem:
    """A problem: the prompt the model continues and the program that tests a completion."""

    id: str
    prompt: str
    head: str  # what precedes the completion in the program (HumanEval: the prompt; MBPP: nothing)
    tests: str  # what follows it: the asserts and the call that runs them
    reference: str  # the dataset's own solution, written as a completion

    def program(self, completion: str) -> str:
        return f"{self.head}{completion}\n{self.tests}\n"


@dataclass(frozen=True)
class CodeTask:
    """A code benchmark: how to read its file, where generation stops, its prompt (documented, versioned)."""

    name: str
    version: str
    template: str
    n_shot: int
    stop: tuple[str, ...]
    load: Callable[[Path], list[CodeProblem]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays exact where the binomials overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# Loaders -----------------------------------------------------------------------------------------

def load_humaneval(path: Path) -> list[CodeProblem]:
    """OpenAI's HumanEval.jsonl(.gz): {task_id, prompt, canonical_solution, test, entry_point} per line."""
    problems = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        prompt, entry = field(row, "prompt", where), field(row, "entry_point", where)
        tests = f"{field(row, 'test', where)}\ncheck({entry})"
        problems.append(CodeProblem(str(field(row, "task_id", where)), prompt, prompt, tests,
                                    field(row, "canonical_solution", where)))
    if not problems:
        raise EvalError(f"{path} holds no problems; pass OpenAI's HumanEval.jsonl.gz")
    return problems


def mbpp_block(text: str, tests: Sequence[str]) -> str:
    """An MBPP problem as the prompt states it, up to and including "[BEGIN]\\n"."""
    return MBPP_INSTRUCTION.format(text=text) + "\n\n" + "\n".join(tests) + "\n[BEGIN]\n"


def mbpp_prompt(shots: Sequence[tuple[str, Sequence[str], str]], text: str, tests: Sequence[str]) -> str:
    """The 3-shot prompt: each (text, tests, code) shot with its solution and [DONE], then the question."""
    solved = [mbpp_block(t, ts) + f"{code}\n[DONE]" for t, ts, code in shots]
    return "\n\n".join([*solved, mbpp_block(text, tests)])


def _mbpp_row(row: dict, where: str) -> tuple[int, str, list[str], str, str]:
    """(task_id, text, test_list, code, test_setup_code) of an mbpp.jsonl row, checked."""
    task_id = field(row, "task_id", where, int)
    tests = field(row, "test_list", where, list)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise EvalError(f"{where}: 'test_list' must be a non-empty list of assert strings")
    setup = field(row, "test_setup_code", where, str, empty_ok=True) if "test_setup_code" in row else ""
    return task_id, field(row, "text", where), tests, field(row, "code", where), setup


def load_mbpp(path: Path) -> list[CodeProblem]:
    """google-research's mbpp.jsonl (all 974 problems): shots are task_id 2-4, the test split task_id 11-510."""
    rows = {}
    for n, row in read_jsonl(path):
        task_id, *rest = _mbpp_row(row, f"{path}:{n}")
        rows[task_id] = rest
    missing = [i for i in MBPP_SHOT_IDS if i not in rows]
    if missing:
        raise EvalError(f"{path} lacks the prompt problems {missing} (task_id 2-4 are the shots); pass the full "
                        "mbpp.jsonl of google-research/mbpp, which holds every split")
    shots = [(rows[i][0], rows[i][1], rows[i][2]) for i in MBPP_SHOT_IDS]
    problems = []
    for task_id in sorted(i for i in rows if i in MBPP_TEST_IDS):
        text, tests, code, setup = rows[task_id]
        problems.append(CodeProblem(str(task_id), mbpp_prompt(shots, text, tests), "", f"{setup}\n" + "\n".join(tests),
                                    code))
    if not problems:
        raise EvalError(f"{path} holds no test problems (task_id 11-510); pass the full mbpp.jsonl")
    return problems


TASKS = {task.name: task for task in (
    CodeTask("humaneval", "1", "{prompt} -> sampled or greedy until \\nclass | \\ndef | \\n# | \\nif | \\nprint; run "
             "{prompt}{completion}\\n{test}\\ncheck({entry_point})", 0, HUMANEVAL_STOP, load_humaneval),
    CodeTask("mbpp", "1", "3 shots (task_id 2-4) '" + MBPP_INSTRUCTION + "\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]' "
             "joined by \\n\\n, then the question up to '[BEGIN]\\n' -> until [DONE]; run {completion}\\n"
             "{test_setup_code}\\n{tests}", 3, ("[DONE]",), load_mbpp),
)}


# Generation and scoring ------------------------------------------------------------------------------

def generate_completions(model: Transformer, tokenizer: Tokenizer, task: CodeTask, problems: Sequence[CodeProblem],
                         window: int, batch_size: int, sampling: Sampling, progress: bool = False
                         ) -> tuple[list[list[str]], list[int]]:
    """Completions per problem (one greedy, or `sampling.samples` sampled) and the prompt tokens cut from each."""
    n = max(sampling.samples, 1)
    params = None if not sampling.samples else [
        SamplingParams(temperature=sampling.temperature, top_p=TOP_P, seed=sample_seed(sampling.seed, i, j))
        for i in range(len(problems)) for j in range(n)]
    outputs = greedy_answers(model, tokenizer, [p.prompt for p in problems for _ in range(n)], window,
                             max_new_tokens(window), task.stop, batch_size, progress, desc=task.name, params=params)
    completions = [[text for text, _ in outputs[i * n:(i + 1) * n]] for i in range(len(problems))]
    return completions, [outputs[i * n][1] for i in range(len(problems))]


def max_new_tokens(window: int) -> int:
    return min(MAX_NEW_TOKENS, window // 2)


def score_completions(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]], pass_k: Sequence[int],
                      limits: Limits | None = None, workers: int | None = None, progress: bool = False,
                      desc: str = "testing") -> tuple[dict[str, float | int], list[dict]]:
    """Run every completion's program in the sandbox: pass@k for each k (and its standard error), the count of
    each outcome, and one record per problem with every sample's completion and outcome."""
    n = len(completions[0]) if completions else 0
    if any(len(c) != n for c in completions) or len(completions) != len(problems):
        raise ValueError("score_completions needs the same number of completions for every problem")
    check_pass_k(pass_k, n)
    runs = run_programs([p.program(c) for p, cs in zip(problems, completions) for c in cs], limits or Limits(), workers,
                        progress, desc)
    records = []
    for i, (problem, texts) in enumerate(zip(problems, completions)):
        mine = runs[i * n:(i + 1) * n]
        c = sum(r.passed for r in mine)
        records.append({"id": problem.id, "n": n, "passed": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in pass_k},
                        "samples": [{"completion": t, **r.to_dict()} for t, r in zip(texts, mine)]})
    metrics: dict[str, float | int] = {}
    for k in pass_k:
        values = [r[f"pass@{k}"] for r in records]
        metrics[f"pass@{k}"] = sum(values) / max(len(values), 1)
        metrics[f"pass@{k}_stderr"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    counts = Counter(r.outcome for r in runs)
    metrics.update({"n": len(records), "samples_per_problem": n, **{f"samples_{o}": counts[o] for o in OUTCOMES}})
    return metrics, records


def check_pass_k(pass_k: Sequence[int], n: int) -> None:
    """pass@k needs k <= n samples per problem."""
    if not pass_k or any(k < 1 for k in pass_k):
        raise EvalError(f"--pass-k needs positive integers, got {list(pass_k)}")
    if max(pass_k) > n:
        raise EvalError(f"pass@{max(pass_k)} needs at least {max(pass_k)} samples per problem, but there are {n}; "
                        f"pass --samples {max(pass_k)} or more (and --temperature > 0)")


def code_sampling(samples: int, temperature: float, seed: int, pass_k: Sequence[int]) -> Sampling:
    """The sampling of a code task, refused (before the model loads) where it cannot give the asked pass@k."""
    if samples and not temperature > 0:
        raise EvalError(f"--samples {samples} samples at temperature {temperature} would all be the greedy "
                        "completion; pass --temperature > 0 (e.g. 0.8), or drop --samples for one greedy completion")
    check_pass_k(pass_k, max(samples, 1))
    return Sampling(samples, temperature, seed)


def score_code(model: Transformer, tokenizer: Tokenizer, task: CodeTask, path: Path, problems: list[CodeProblem],
               window: int, batch_size: int, sampling: Sampling, pass_k: Sequence[int], limits: Limits | None = None,
               workers: int | None = None, progress: bool = False) -> TaskResult:
    """Generate completions for each problem, run their tests in the sandbox, report pass@k."""
    check_pass_k(pass_k, max(sampling.samples, 1))
    completions, cuts = generate_completions(model, tokenizer, task, problems, window, batch_size, sampling, progress)
    metrics, records = score_completions(problems, completions, pass_k, limits, workers, progress, f"{task.name} tests")
    for record, cut in zip(records, cuts):
        record["truncated_tokens"] = cut
    metrics["truncated_examples"] = sum(cut > 0 for cut in cuts)
    return TaskResult(task.name, metrics, settings(task, path, window, sampling, pass_k, limits or Limits(), workers),
                      records)


def settings(task: CodeTask, path: Path, window: int, sampling: Sampling, pass_k: Sequence[int], limits: Limits,
             workers: int | None) -> dict:
    """What produced a code task's numbers, for the results file."""
    sampled = bool(sampling.samples)
    return {"template_version": task.version, "template": task.template, "n_shot": task.n_shot,
            "stop": list(task.stop), "max_new_tokens": max_new_tokens(window),
            "decoding": f"{sampling.samples} samples per problem" if sampled else "one greedy completion per problem",
            "samples": sampling.samples, "temperature": sampling.temperature if sampled else 0.0,
            "top_p": TOP_P if sampled else None, "sampling_seed": sampling.seed if sampled else None,
            "pass_k": list(pass_k), "estimator": "pass@k = 1 - C(n-c, k) / C(n, k) per problem (Chen et al. 2021), "
            "averaged; n samples, c passing", "sandbox_limits": asdict(limits), "sandbox": describe(),
            "workers": workers or os.cpu_count(), "data": str(path), "data_sha256": sha256_of([path])}
