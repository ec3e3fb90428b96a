"""MMLU: k-shot (default 5) from the dev split in the standard prompt, scored by the answer letter's likelihood.

Prompt (version 1, as lm-evaluation-harness; Hendrycks' original has a second space after "about"):

    The following are multiple choice questions (with answers) about {subject, _ as space}.\\n\\n
    then per shot: {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n
    then the test question in the same form, ending "Answer:".

The candidates are " A", " B", " C", " D". The shots are the first k rows of the subject's dev file;
when the prompt does not fit the context window, shots are dropped from the end, one at a time, and
each record says how many were used. A prompt that does not fit even with no shots loses its oldest
tokens (counted as truncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.multiple_choice import TaskResult, score_examples, stderr_of_mean
from llamakit.eval.readers import read_csv, sha256_of
from llamakit.eval.tasks import MCExample
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

VERSION = "1"
LETTERS = "ABCD"
TEMPLATE = ("The following are multiple choice questions (with answers) about {subject}.\n\n"
            "[{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {letter}\n\n] x n_shot "
            "{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: -> ' A' | ' B' | ' C' | ' D'")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


@dataclass(frozen=True)
class Question:
    """One MMLU row: the question, its four options and the right option's index."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int


def read_subject(path: Path) -> list[Question]:
    """An MMLU CSV: official (no header, answer letter A-D) or with a header row and answers 0-3."""
    rows = read_csv(path)
    numeric = bool(rows) and [c.strip().lower() for c in rows[0][1]] == HEADER
    questions = []
    for line, row in rows[1:] if numeric else rows:
        if len(row) != 6:
            raise EvalError(f"{path}:{line}: {len(row)} fields; an MMLU row is question, 4 options, answer")
        answer = row[5].strip()
        index = "0123".find(answer) if numeric else LETTERS.find(answer.upper())
        if not answer or index < 0:
            raise EvalError(f"{path}:{line}: answer {answer!r} is not one of {'0-3' if numeric else 'A-D'}")
        questions.append(Question(row[0], (row[1], row[2], row[3], row[4]), index))
    return questions


def subjects_in(folder: Path, split: str = "test") -> list[str]:
    """The subjects of an MMLU data folder (dev/ and test/ hold <subject>_dev.csv and <subject>_test.csv)."""
    files = sorted((folder / split).glob(f"*_{split}.csv"))
    if not files:
        raise EvalError(f"{folder}: no {split}/*_{split}.csv files; pass the MMLU data folder (the one holding dev/ "
                        "and test/)")
    return [f.name.removesuffix(f"_{split}.csv") for f in files]


def format_question(q: Question, with_answer: bool) -> str:
    """A question, its lettered options and 'Answer:' (followed by the letter and a blank line for a shot)."""
    text = q.question.strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return text + (f"\nAnswer: {LETTERS[q.answer]}\n\n" if with_answer else "\nAnswer:")


def prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    """The full k-shot prompt for one test question."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def fitted_prompt(tokenizer: Tokenizer, subject: str, shots: Sequence[Question], question: Question,
                  window: int) -> tuple[str, int]:
    """The prompt with as many of the shots as fit the window (dropped from the end), and that number."""
    for k in range(len(shots), 0, -1):
        text = prompt(subject, shots[:k], question)
        if len(tokenizer.encode(text + " A", bos=True)) - 1 <= window:
            return text, k
    return prompt(subject, [], question), 0


def load_examples(tokenizer: Tokenizer, folder: Path, n_shot: int, window: int, limit: int | None
                  ) -> tuple[list[MCExample], list[tuple[str, int]]]:
    """Examples of every subject (the first `limit` of each) and each one's (subject, shots used)."""
    examples, meta = [], []
    for subject in subjects_in(folder):
        test = read_subject(folder / "test" / f"{subject}_test.csv")[:limit]
        shots = _dev_shots(folder, subject, n_shot)
        for i, q in enumerate(test):
            text, k = fitted_prompt(tokenizer, subject, shots, q, window)
            examples.append(MCExample(f"{subject}/{i}", tuple((text, " " + letter) for letter in LETTERS), q.answer,
                                      tuple(LETTERS)))
            meta.append((subject, k))
    return examples, meta


def _dev_shots(folder: Path, subject: str, n_shot: int) -> list[Question]:
    if n_shot == 0:
        return []
    dev = read_subject(folder / "dev" / f"{subject}_dev.csv")
    if len(dev) < n_shot:
        raise EvalError(f"{folder / 'dev' / f'{subject}_dev.csv'} has {len(dev)} questions for {n_shot} shots; "
                        "lower --num-fewshot")
    return dev[:n_shot]


def evaluate_mmlu(model: Transformer, tokenizer: Tokenizer, folder: Path, window: int, batch_size: int,
                  n_shot: int = 5, limit: int | None = None, progress: bool = False) -> TaskResult:
    """Per-subject accuracy, micro (over questions) and macro (over subjects) averages, and every record."""
    examples, meta = load_examples(tokenizer, folder, n_shot, window, limit)
    return score_mmlu(model, tokenizer, folder, examples, meta, window, batch_size, n_shot, progress)


def score_mmlu(model: Transformer, tokenizer: Tokenizer, folder: Path, examples: list[MCExample],
               meta: list[tuple[str, int]], window: int, batch_size: int, n_shot: int,
               progress: bool = False) -> TaskResult:
    """Score examples made by load_examples and aggregate them per subject."""
    records = score_examples(model, tokenizer, examples, window, batch_size, progress, desc="mmlu")
    by_subject: dict[str, list[int]] = {}
    for record, (subject, k) in zip(records, meta):
        record.update(subject=subject, n_shot=k)
        for key in ("pred_norm", "acc_norm", "n_chars"):  # every answer is one letter: acc_norm is acc
            del record[key]
        by_subject.setdefault(subject, []).append(record["acc"])
    details = {s: {"acc": sum(hits) / len(hits), "n": len(hits)} for s, hits in by_subject.items()}
    hits = [r["acc"] for r in records]
    metrics = {"acc": sum(hits) / max(len(hits), 1), "acc_stderr": stderr_of_mean(hits),
               "acc_macro": sum(d["acc"] for d in details.values()) / max(len(details), 1), "n": len(records),
               "subjects": len(details), "mean_n_shot": sum(k for _, k in meta) / max(len(meta), 1),
               "truncated_examples": sum(r["truncated_tokens"] > 0 for r in records)}
    settings = {"template_version": VERSION, "template": TEMPLATE, "n_shot": n_shot,
                "shots": "the first n_shot dev rows, dropped from the end until the prompt fits the window "
                "(each record's n_shot says how many were used)",
                "normalisation": "none: the letters ' A'..' D' are compared by log-probability", "data": str(folder),
                "data_sha256": sha256_of(list(folder.glob("*/*.csv")))}
    return TaskResult("mmlu", metrics, settings, records, details)
