"""Closed-book QA (NaturalQuestions, TriviaQA): a greedy answer up to a newline, exact match against any alias.

Prompt (version 1), the LLaMA paper's 1-shot format with its own example as the shot:

    Answer these questions:\\nQ: Who sang who wants to be a millionaire in high society?\\nA: Frank Sinatra\\n
    Q: {question}\\nA:

Answers and aliases are normalised as SQuAD's evaluation does: lower case, punctuation removed, the
articles a/an/the removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.multiple_choice import TaskResult, stderr_of_mean
from llamakit.eval.readers import read_jsonl, sha256_of
from llamakit.eval.scoring import greedy_answers
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

VERSION = "1"
INSTRUCTION = "Answer these questions:\n"
PAPER_SHOT = ("Who sang who wants to be a millionaire in high society?", "Frank Sinatra")
MAX_NEW_TOKENS = 32
TEMPLATE = "Answer these questions:\\n[Q: {shot question}\\nA: {shot answer}\\n] Q: {question}\\nA: -> greedy until \\n"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class QAExample:
    """A question and every answer that counts as right."""

    id: str
    question: str
    answers: tuple[str, ...]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Whether the normalised prediction equals any normalised answer."""
    guess = normalize_answer(prediction)
    return any(guess == normalize_answer(a) for a in answers)


def qa_prompt(question: str, n_shot: int = 1) -> str:
    """The paper's prompt: the instruction, its example question (n_shot 1) and the question."""
    shot = f"Q: {PAPER_SHOT[0]}\nA: {PAPER_SHOT[1]}\n" if n_shot else ""
    return f"{INSTRUCTION}{shot}Q: {question.strip()}\nA:"


def _answers(row: dict, where: str) -> tuple[str, ...]:
    """Aliases from 'answer'/'answers' (a string or list: NQ-open) or TriviaQA's 'Answer': {Value, Aliases}."""
    value = row.get("answers", row.get("answer"))
    if isinstance(row.get("Answer"), dict):
        value = [row["Answer"].get("Value", "")] + list(row["Answer"].get("Aliases", []))
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not [a for a in value if isinstance(a, str) and a.strip()]:
        raise EvalError(f"{where}: no answers; give 'answer' or 'answers' (a string or a list of strings), or "
                        "TriviaQA's 'Answer': {'Value', 'Aliases'}")
    return tuple(a for a in value if isinstance(a, str) and a.strip())


def load_qa(path: Path) -> list[QAExample]:
    """JSONL rows {question, answer(s)} (NQ-open) or {Question, Answer: {Value, Aliases}} (TriviaQA)."""
    examples = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        question = row.get("question", row.get("Question"))
        if not isinstance(question, str) or not question.strip():
            raise EvalError(f"{where}: missing 'question' (a non-empty string)")
        examples.append(QAExample(str(row.get("id", row.get("QuestionId", n))), question, _answers(row, where)))
    return examples


def evaluate_qa(model: Transformer, tokenizer: Tokenizer, name: str, path: Path, window: int, batch_size: int,
                n_shot: int = 1, limit: int | None = None, progress: bool = False) -> TaskResult:
    """Exact match of greedy answers to the questions of a JSONL file."""
    return score_qa(model, tokenizer, name, path, load_qa(path)[:limit], window, batch_size, n_shot, progress)


def score_qa(model: Transformer, tokenizer: Tokenizer, name: str, path: Path, examples: list[QAExample], window: int,
             batch_size: int, n_shot: int = 1, progress: bool = False) -> TaskResult:
    """Exact match of greedy answers, with each record's prediction and gold aliases."""
    if n_shot not in (0, 1):
        raise EvalError(f"{name} uses the paper's 1-shot prompt; --num-fewshot must be 0 or 1, not {n_shot}")
    outputs = greedy_answers(model, tokenizer, [qa_prompt(e.question, n_shot) for e in examples], window,
                             MAX_NEW_TOKENS, ("\n",), batch_size, progress, desc=name)
    records = [{"id": e.id, "question": e.question, "prediction": text.strip(), "answers": list(e.answers),
                "em": int(exact_match(text.strip(), e.answers)), "truncated_tokens": cut}
               for e, (text, cut) in zip(examples, outputs)]
    hits = [r["em"] for r in records]
    metrics = {"em": sum(hits) / max(len(hits), 1), "em_stderr": stderr_of_mean(hits), "n": len(records),
               "truncated_examples": sum(r["truncated_tokens"] > 0 for r in records)}
    settings = {"template_version": VERSION, "template": TEMPLATE, "n_shot": n_shot, "max_new_tokens": MAX_NEW_TOKENS,
                "normalisation": "SQuAD: lower case, punctuation and articles (a, an, the) removed, whitespace "
                "collapsed; exact match against any alias", "data": str(path), "data_sha256": sha256_of([path])}
    return TaskResult(name, metrics, settings, records)
