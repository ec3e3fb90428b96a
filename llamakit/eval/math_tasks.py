"""Grade-school and competition maths: GSM8K (8-shot chain of thought) and MATH (4-shot Minerva prompt).

Each problem is answered greedily (`em`, the papers' maj1@1); with `--samples K` it is also answered K
times by temperature sampling, and the most common final answer is scored (`maj@k`, self-consistency,
Wang et al. 2022; LLaMA's maj1@k). Invalid answers (nothing extracted) do not vote; ties go to the
answer seen first. Every sample draws from its own seed (run seed, problem, sample), so answers do not
depend on the batch size. Prompts follow lm-evaluation-harness (`gsm8k_cot`, `minerva_math`).

GSM8K (version 1): the 8 exemplars of Wei et al. (2022), "Q: {question}\\nA: {chain}. The answer is N."
joined by blank lines, then "Q: {question}\\nA:"; generation stops at "Q:" or a blank line. The
answer is the number after the first "The answer is" (else the last number in the output); answer
and gold (after "#### ") lose commas, "$" and a final period, then must be equal strings.

MATH (version 1): the 4 exemplars of Lewkowycz et al. (2022), "Problem:\\n{problem}\\n\\nSolution: {solution}"
joined by blank lines, then "Problem:\\n{problem}\\n\\nSolution:"; generation stops at "Problem:". The
answer follows "Final Answer: The final answer is" (else the last \\boxed{} of the output); gold is the
last \\boxed{} of the reference solution; both pass Minerva's `normalize_final_answer` and must be equal
strings (Minerva also tries SymPy equivalence; we do not, so this is lm-eval's exact_match).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.math_prompts import GSM8K_SHOTS, MINERVA_SHOTS
from llamakit.eval.minerva import last_boxed, normalize_final_answer
from llamakit.eval.multiple_choice import TaskResult, stderr_of_mean
from llamakit.eval.readers import field, numbered_order, read_json_object, read_jsonl, sha256_of
from llamakit.eval.scoring import greedy_answers
from llamakit.generate import SamplingParams
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

MAX_NEW_TOKENS = 256  # lm-eval's default max_gen_toks for both tasks


@dataclass(frozen=True)
class Problem:
    """A question, its normalised gold answer, and (MATH) its subject and level."""

    id: str
    question: str
    gold: str
    subject: str = ""
    level: str = ""


@dataclass(frozen=True)
class Answer:
    """What was read from one generated solution: the normalised answer (None: none found) and how."""

    value: str | None
    found_by: str  # "answer phrase", "last number", "last boxed" or "none"


@dataclass(frozen=True)
class MathTask:
    """A generation task: its loader, prompt, answer reader and stop strings (documented, versioned)."""

    name: str
    version: str
    template: str
    default_shots: int
    max_shots: int
    stop: tuple[str, ...]
    load: Callable[[Path], list[Problem]]
    prompt: Callable[[str, int], str]
    extract: Callable[[str], Answer]
    normalisation: str


# GSM8K -------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"The answer is \$?(-?[0-9.,]*[0-9])")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


def normalize_number(text: str) -> str:
    """lm-eval's gsm8k rule: commas and '$' removed, a final period removed, surrounding space stripped."""
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "").strip()).strip()


def extract_gsm8k(text: str) -> Answer:
    """The number after the first 'The answer is', else the last number of the text."""
    if match := _ANSWER_IS.search(text):
        return Answer(normalize_number(match.group(1)), "answer phrase")
    numbers = _NUMBER.findall(text)
    return Answer(normalize_number(numbers[-1]), "last number") if numbers else Answer(None, "none")


def gsm8k_prompt(question: str, n_shot: int = 8) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_SHOTS[:n_shot])
    return f"{shots}Q: {question}\nA:"


def load_gsm8k(path: Path) -> list[Problem]:
    """The official JSONL (grade-school-math/data/test.jsonl): {question, answer ending '#### N'}."""
    problems = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        question, answer = field(row, "question", where), field(row, "answer", where)
        if "####" not in answer:
            raise EvalError(f"{where}: the answer has no '#### N' final line; is this the official GSM8K file?")
        gold = normalize_number(answer.split("####")[-1])
        if not gold:
            raise EvalError(f"{where}: nothing after '####' in the answer")
        problems.append(Problem(str(row.get("id", n)), question, gold))
    return problems


# MATH --------------------------------------------------------------------------------------------

_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def extract_math(text: str) -> Answer:
    """The normalised final answer: Minerva's closing sentence, else the output's last \\boxed{}."""
    if match := _FINAL_ANSWER.search(text + "I hope it is correct."):  # lm-eval's rule: the sentence may be cut off
        return Answer(normalize_final_answer(match.group(1).strip()), "answer phrase")
    boxed = last_boxed(text)
    return Answer(normalize_final_answer(boxed), "last boxed") if boxed is not None else Answer(None, "none")


def math_prompt(problem: str, n_shot: int = 4) -> str:
    shots = "".join(f"Problem:\n{p}\n\nSolution: {s}\n\n" for p, s in MINERVA_SHOTS[:n_shot])
    return f"{shots}Problem:\n{problem}\n\nSolution:"


def _math_problem(row: dict, where: str, id: str, subject: str = "") -> Problem:
    problem, solution = field(row, "problem", where), field(row, "solution", where)
    boxed = last_boxed(solution)
    if boxed is None and not isinstance(row.get("answer"), str):
        raise EvalError(f"{where}: the solution has no \\boxed{{}} answer (and there is no 'answer' field); is this "
                        "the official MATH format?")
    gold = normalize_final_answer(boxed if boxed is not None else row["answer"])
    subject = str(row.get("type", row.get("subject", subject)))
    return Problem(str(row.get("unique_id", id)), problem, gold, subject, str(row.get("level", "")))


def load_math(path: Path) -> list[Problem]:
    """The official release (a folder of <subject>/<n>.json: problem, level, type, solution), or JSONL rows."""
    if not path.is_dir():
        return [_math_problem(row, f"{path}:{n}", str(n)) for n, row in read_jsonl(path)]
    files = sorted(path.rglob("*.json"), key=numbered_order)
    if not files:
        raise EvalError(f"{path}: no <subject>/<n>.json files; pass the MATH test folder (e.g. MATH/test) or JSONL")
    if any("train" in f.relative_to(path).parts[:-1] for f in files):
        raise EvalError(f"{path} holds training problems (a train/ folder); pass the test folder, MATH/test")
    problems = []
    for file in files:
        row = read_json_object(file, "a MATH problem", "problem, level, type, solution")
        problems.append(_math_problem(row, str(file), f"{file.parent.name}/{file.stem}", file.parent.name))
    return problems


TASKS = {task.name: task for task in (
    MathTask("gsm8k", "1", "[Q: {exemplar question}\\nA: {exemplar chain}. The answer is {N}.\\n\\n] x n_shot "
             "Q: {question}\\nA: -> generate until 'Q:' or '\\n\\n'", 8, len(GSM8K_SHOTS), ("Q:", "\n\n"),
             load_gsm8k, gsm8k_prompt, extract_gsm8k,
             "the number after the first 'The answer is', else the last number; commas, '$' and a final period "
             "removed from answer and gold ('#### N'); exact string match"),
    MathTask("math", "1", "[Problem:\\n{exemplar problem}\\n\\nSolution: {exemplar solution ... Final Answer: The "
             "final answer is $X$. I hope it is correct.}\\n\\n] x n_shot Problem:\\n{problem}\\n\\nSolution: -> "
             "generate until 'Problem:'", 4, len(MINERVA_SHOTS), ("Problem:",), load_math, math_prompt, extract_math,
             "the answer after 'Final Answer: The final answer is' (else the last \\boxed{} of the output) and the "
             "last \\boxed{} of the reference, each through Minerva's normalize_final_answer (Lewkowycz et al. 2022, "
             "appendix D); exact string match, no SymPy equivalence"),
)}


# Scoring -----------------------------------------------------------------------------------------

def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer (None never votes); on a tie, the one that appears first."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: counts[a]) if counts else None  # max keeps the first of equals


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """A seed of its own for each (run seed, problem index, sample index)."""
    return ((seed << 40) + (problem << 20) + sample) % (1 << 63)


@dataclass(frozen=True)
class Sampling:
    """maj@k settings: k samples per problem (0: greedy only) at a temperature, seeded."""

    samples: int = 0
    temperature: float = 0.6
    seed: int = 0

    def __post_init__(self):
        if self.samples < 0 or (self.samples and not 0 < self.temperature < 100):
            raise EvalError(f"maj@k needs --samples >= 0 and a --temperature above 0 (got {self.samples} samples at "
                            f"{self.temperature}); greedy answers are always scored")


def score_math(model: Transformer, tokenizer: Tokenizer, task: MathTask, path: Path, problems: list[Problem],
               window: int, batch_size: int, n_shot: int, sampling: Sampling = Sampling(),
               progress: bool = False) -> TaskResult:
    """Greedy exact match (em) and, with samples, maj@k and the mean accuracy of single samples."""
    prompts = [task.prompt(p.question, n_shot) for p in problems]
    greedy = greedy_answers(model, tokenizer, prompts, window, MAX_NEW_TOKENS, task.stop, batch_size, progress,
                            desc=task.name)
    records = []
    for problem, (text, cut) in zip(problems, greedy):
        answer = task.extract(text)
        records.append({"id": problem.id, "gold": problem.gold, "output": text, "answer": answer.value,
                        "found_by": answer.found_by, "em": int(answer.value == problem.gold),
                        "truncated_tokens": cut, **({"subject": problem.subject} if problem.subject else {}),
                        **({"level": problem.level} if problem.level else {})})
    if sampling.samples:
        _add_votes(model, tokenizer, task, problems, prompts, records, window, batch_size, sampling, progress)
    return TaskResult(task.name, _metrics(records, sampling.samples), _settings(task, path, n_shot, sampling),
                      records, _by_subject(records))


def _add_votes(model, tokenizer, task: MathTask, problems, prompts, records, window, batch_size,
               sampling: Sampling, progress) -> None:
    """Sample k solutions per problem; each record gets the k answers, their vote and its correctness."""
    k = sampling.samples
    params = [SamplingParams(temperature=sampling.temperature, top_p=1.0, seed=sample_seed(sampling.seed, i, j))
              for i in range(len(problems)) for j in range(k)]
    texts = greedy_answers(model, tokenizer, [p for p in prompts for _ in range(k)], window, MAX_NEW_TOKENS, task.stop,
                           batch_size, progress, desc=f"{task.name} maj@{k}", params=params)
    for i, (problem, record) in enumerate(zip(problems, records)):
        answers = [task.extract(text).value for text, _ in texts[i * k:(i + 1) * k]]
        vote = majority_vote(answers)
        record.update(samples=answers, majority=vote, maj_em=int(vote == problem.gold),
                      sample_em=sum(a == problem.gold for a in answers) / k)


def _metrics(records: list[dict], k: int) -> dict[str, float | int]:
    n = max(len(records), 1)
    hits = [r["em"] for r in records]
    metrics: dict[str, float | int] = {"em": sum(hits) / n, "em_stderr": stderr_of_mean(hits), "n": len(records),
                                       "no_answer": sum(r["answer"] is None for r in records),
                                       "truncated_examples": sum(r["truncated_tokens"] > 0 for r in records)}
    if k:
        votes = [r["maj_em"] for r in records]
        metrics.update({"maj@k": sum(votes) / n, "maj@k_stderr": stderr_of_mean(votes), "k": k,
                        "sample_em": sum(r["sample_em"] for r in records) / n})
    return metrics


def _by_subject(records: list[dict]) -> dict[str, dict]:
    """MATH's per-subject accuracy (greedy exact match)."""
    hits: dict[str, list[int]] = {}
    for r in records:
        if r.get("subject"):
            hits.setdefault(r["subject"], []).append(r["em"])
    return {s: {"acc": sum(h) / len(h), "n": len(h)} for s, h in hits.items()} if len(hits) > 1 else {}


def _settings(task: MathTask, path: Path, n_shot: int, sampling: Sampling) -> dict:
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    return {"template_version": task.version, "template": task.template, "n_shot": n_shot,
            "max_new_tokens": MAX_NEW_TOKENS, "stop": list(task.stop), "normalisation": task.normalisation,
            "greedy": "em: one greedy solution per problem (maj1@1)",
            "samples": sampling.samples, "temperature": sampling.temperature if sampling.samples else None,
            "top_p": 1.0 if sampling.samples else None, "sampling_seed": sampling.seed if sampling.samples else None,
            "vote": "maj@k: the most common extracted answer of k samples (invalid ones do not vote, ties go to the "
            "first seen); sample_em: the mean accuracy of single samples", "data": str(path),
            "data_sha256": sha256_of(files)}


def shots_for(task: MathTask, num_fewshot: int | None) -> int:
    """The number of exemplars: the task's default, or --num-fewshot up to the published count."""
    shots = task.default_shots if num_fewshot is None else num_fewshot
    if shots > task.max_shots:
        raise EvalError(f"{task.name} has {task.max_shots} published exemplars; --num-fewshot must be at most "
                        f"{task.max_shots}, not {shots}")
    return shots


def load_task(task: MathTask, path: Path, limit: int | None) -> list[Problem]:
    problems = task.load(path)[:limit]
    if not problems:
        raise EvalError(f"{path} has no problems for task {task.name}; pass the task's data file")
    return problems
