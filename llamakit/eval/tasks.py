"""Zero-shot multiple-choice tasks: loaders for the official files and the prompt of each, versioned.

Every task turns a row into candidate (context, continuation) pairs; the model picks the pair whose
continuation is most likely. Prompts are those of lm-evaluation-harness, so numbers compare; a change
to a prompt or to preprocessing must bump the task's `version`, which every result file records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.readers import field, labels_beside, read_jsonl, read_labels, read_lines


@dataclass(frozen=True)
class MCExample:
    """One question: a (context, continuation) pair per candidate answer, and the right one's index."""

    id: str
    choices: tuple[tuple[str, str], ...]
    gold: int
    answers: tuple[str, ...]  # each candidate as lm-evaluation-harness's doc_to_choice has it: acc_norm's length


@dataclass(frozen=True)
class MCTask:
    """A multiple-choice task: how to read its file, and the prompt it uses (documented, versioned)."""

    name: str
    version: str
    template: str  # the prompt in words, recorded in the results
    folder: str  # its subfolder under --data-dir
    files: tuple[str, ...]  # file names looked for, in order, when the data path is a folder
    load: Callable[[Path], list[MCExample]]


def _shared(id: str, context: str, endings: list[str], gold: int) -> MCExample:
    """An example whose candidates share one context; each ending follows it after a space (lm-eval's
    target_delimiter), and the ending without that space is the candidate's answer."""
    return MCExample(id, tuple((context, " " + ending) for ending in endings), gold, tuple(endings))


def _gold(value, count: int, where: str, first: int = 0) -> int:
    """A label (an int or a digit string) numbering `count` choices from `first`, as a 0-based index."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not first <= value < first + count:
        raise EvalError(f"{where}: label {value!r} is not a choice number {first}..{first + count - 1}")
    return value - first


# HellaSwag ---------------------------------------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
    """The published clean-up of HellaSwag text (WikiHow rows carry [title]/[header]/[step] markers)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")  # one pass, as published: three spaces become two


def hellaswag_row(row: dict, where: str) -> MCExample:
    """An official hellaswag_*.jsonl row: activity label, ctx_a, capitalised ctx_b, four endings."""
    endings = field(row, "endings", where, list)
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise EvalError(f"{where}: 'endings' must be a list of 4 strings")
    context = field(row, "ctx_a", where) + " " + field(row, "ctx_b", where, empty_ok=True).capitalize()
    query = hellaswag_preprocess(field(row, "activity_label", where) + ": " + context)
    gold = _gold(field(row, "label", where, (int, str)), 4, where)
    return _shared(str(row.get("ind", where)), query, [hellaswag_preprocess(e) for e in endings], gold)


def load_hellaswag(path: Path) -> list[MCExample]:
    """Official JSONL (rowanz/hellaswag), or the preprocessed text form: 6 lines per task (.txt, .txt.bz2)."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return [hellaswag_row(row, f"{path}:{n}") for n, row in read_jsonl(path)]
    lines = read_lines(path)
    if not lines or len(lines) % 6:
        raise EvalError(f"{path}: {len(lines)} lines is not a multiple of 6; the text form is 6 lines per task "
                        "(context, label 0-3, four endings)")
    examples = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start:start + 6]
        gold = _gold(label, 4, f"{path}:{start + 2}")
        examples.append(_shared(str(start // 6), context, endings, gold))
    return examples


# PIQA, SIQA: JSONL plus a labels file beside it -----------------------------------------------------

def _labels(path: Path, rows: list[tuple[int, dict]], key: str, allowed: set[str]) -> list[str]:
    """Labels from each row's `key` field, else from the official name-labels.lst beside the file."""
    if rows and all(key in row for _, row in rows):
        return [str(row[key]) for _, row in rows]
    labels_file = labels_beside(path)
    if not labels_file.is_file():
        raise EvalError(f"{path}: the rows have no {key!r} and there is no labels file {labels_file}; put the "
                        "official labels file beside the data")
    return read_labels(labels_file, len(rows), allowed)


def load_piqa(path: Path) -> list[MCExample]:
    """Official PIQA: {goal, sol1, sol2} lines, labels 0/1 in valid-labels.lst (or a 'label' field)."""
    rows = list(read_jsonl(path))
    labels = _labels(path, rows, "label", {"0", "1"})
    examples = []
    for (n, row), label in zip(rows, labels):
        where = f"{path}:{n}"
        context = f"Question: {field(row, 'goal', where)}\nAnswer:"
        solutions = [field(row, "sol1", where), field(row, "sol2", where)]
        examples.append(_shared(str(n), context, solutions, _gold(label, 2, where)))
    return examples


def load_siqa(path: Path) -> list[MCExample]:
    """Official Social IQa: {context, question, answerA-C} lines, labels 1-3 in dev-labels.lst (or 'label')."""
    rows = list(read_jsonl(path))
    labels = _labels(path, rows, "label", {"1", "2", "3"})
    examples = []
    for (n, row), label in zip(rows, labels):
        where = f"{path}:{n}"
        context = f"Q: {field(row, 'context', where)} {field(row, 'question', where)}\nA:"
        answers = [field(row, f"answer{letter}", where) for letter in "ABC"]
        examples.append(_shared(str(n), context, answers, _gold(label, 3, where, first=1)))
    return examples


# ARC and OpenBookQA: the AI2 question format ------------------------------------------------------

def _ai2_rows(path: Path, template: str) -> list[MCExample]:
    """{id, question: {stem, choices: [{text, label}]}, answerKey} lines; `template` formats the stem."""
    examples = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        question = field(row, "question", where, dict)
        choices = field(question, "choices", where, list)
        if len(choices) < 2 or not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
            raise EvalError(f"{where}: 'question.choices' must be a list of {{text, label}} objects")
        labels = [str(c["label"]) for c in choices]
        key = str(field(row, "answerKey", where)).strip()
        if key not in labels:
            raise EvalError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        context = template.format(stem=field(question, "stem", where))
        examples.append(_shared(str(row.get("id", n)), context, [str(c["text"]) for c in choices], labels.index(key)))
    return examples


def load_arc(path: Path) -> list[MCExample]:
    """Official ARC (ARC-Easy-Test.jsonl, ARC-Challenge-Test.jsonl, ...)."""
    return _ai2_rows(path, "Question: {stem}\nAnswer:")


def load_openbookqa(path: Path) -> list[MCExample]:
    """Official OpenBookQA (Data/Main/test.jsonl): the bare question stem is the context."""
    return _ai2_rows(path, "{stem}")


# BoolQ, WinoGrande -------------------------------------------------------------------------------

def load_boolq(path: Path) -> list[MCExample]:
    """Official BoolQ: {question, passage, answer: true/false} lines; the choices are ' no' and ' yes'."""
    examples = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        context = f"{field(row, 'passage', where)}\nQuestion: {field(row, 'question', where)}?\nAnswer:"
        answer = field(row, "answer", where, bool)
        examples.append(_shared(str(n), context, ["no", "yes"], int(answer)))
    return examples


def load_winogrande(path: Path) -> list[MCExample]:
    """Official WinoGrande: {sentence with one '_', option1, option2, answer '1'/'2'}.

    Partial scoring: each option fills the blank to make a context, and the likelihood of the rest of
    the sentence (the same for both) decides. As in lm-eval, a candidate's answer is its context.
    """
    examples = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        sentence = field(row, "sentence", where)
        if sentence.count("_") != 1:
            raise EvalError(f"{where}: the sentence must contain exactly one '_' blank")
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        options = [field(row, "option1", where), field(row, "option2", where)]
        gold = _gold(field(row, "answer", where, (str, int)), 2, where, first=1)
        contexts = tuple(sentence[:blank] + o for o in options)
        examples.append(MCExample(str(row.get("qID", n)), tuple((c, rest) for c in contexts), gold, contexts))
    return examples


TASKS = {task.name: task for task in (
    MCTask("hellaswag", "1", "{activity_label}: {ctx_a} {ctx_b capitalised} -> ' {ending}' (HellaSwag clean-up "
           "applied; the text form is used as given)", "hellaswag",
           ("hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"), load_hellaswag),
    MCTask("piqa", "1", "Question: {goal}\\nAnswer: -> ' {sol}'", "piqa", ("valid.jsonl",), load_piqa),
    MCTask("siqa", "1", "Q: {context} {question}\\nA: -> ' {answer}'", "siqa", ("dev.jsonl",), load_siqa),
    MCTask("arc_easy", "1", "Question: {stem}\\nAnswer: -> ' {choice}'", "arc",
           ("ARC-Easy/ARC-Easy-Test.jsonl", "ARC-Easy-Test.jsonl"), load_arc),
    MCTask("arc_challenge", "1", "Question: {stem}\\nAnswer: -> ' {choice}'", "arc",
           ("ARC-Challenge/ARC-Challenge-Test.jsonl", "ARC-Challenge-Test.jsonl"), load_arc),
    MCTask("openbookqa", "1", "{stem} -> ' {choice}'", "openbookqa", ("Main/test.jsonl", "test.jsonl"),
           load_openbookqa),
    MCTask("boolq", "1", "{passage}\\nQuestion: {question}?\\nAnswer: -> ' no' | ' yes'", "boolq",
           ("dev.jsonl", "val.jsonl"), load_boolq),
    MCTask("winogrande", "1", "{sentence up to _}{option} -> ' {rest of sentence}' (partial scoring)",
           "winogrande", ("dev.jsonl",), load_winogrande),
)}
