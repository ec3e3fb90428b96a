"""RACE reading comprehension (Lai et al., 2017), zero-shot by log-likelihood, as lm-evaluation-harness's `race`.

Prompt (version 1, lm-eval's race v3, after the GPT-3 paper): one example per article, asking its *last*
question; the article's earlier questions come before it with their answers.

    Article: {article}\\n\\n
    then per earlier question: Question: {question}\\nAnswer: {answer text}\\n
        (a fill-in question ending "  _  ." becomes the question with the answer in the blank, then \\n)
    then the last question as it is -> ' {option}' for each of the four options

So RACE-high's test set gives one example per article (lm-eval's 1,045), not one per question. lm-eval's
`race` is our `race_high`; `race` here scores every article under the folder and reports each level.

Files read: the official release (RACE/test/{middle,high}/<n>.txt, one JSON article per file with
`article`, `questions`, `options`, `answers`, `id`), or JSON lines in one of three shapes: an official
article per line; a question per line as on the Hugging Face hub (ehovy/race: `example_id`, `article`,
`question`, `options`, `answer`; consecutive rows of one article are grouped); or EleutherAI/race rows
(`article`, `problems`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval.multiple_choice import TaskResult, accuracy, score_examples
from llamakit.eval.readers import field, numbered_order, read_json_object, read_jsonl, sha256_of
from llamakit.eval.tasks import MCExample
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

VERSION = "1"
TEMPLATE = ("Article: {article}\\n\\n[Question: {question}\\nAnswer: {answer}\\n | {fill-in question with its "
            "answer}\\n] per earlier question of the article, then {last question} -> ' {option}' x 4")
LETTERS = "ABCD"
LEVELS = ("middle", "high")
_BLANK = "  _  ."  # how RACE's fill-in-the-blank questions end


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: int


@dataclass(frozen=True)
class Article:
    """A RACE article and its questions in file order; `level` is middle, high or '' when not known."""

    id: str
    level: str
    article: str
    questions: tuple[Question, ...]


def _question(question, options, answer, where: str) -> Question:
    if not isinstance(question, str):
        raise EvalError(f"{where}: a question must be a string, got {question!r}")
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) for o in options):
        raise EvalError(f"{where}: options must be a list of 4 strings, got {options!r}")
    if not isinstance(answer, str) or answer.strip() not in tuple(LETTERS):
        raise EvalError(f"{where}: answer {answer!r} is not one of A, B, C, D")
    return Question(question, (options[0], options[1], options[2], options[3]), LETTERS.index(answer.strip()))


def article_from_official(data: dict, where: str, level: str = "") -> Article:
    """An article as the official release stores it: parallel lists `questions`, `options`, `answers`."""
    questions = field(data, "questions", where, list)
    options, answers = field(data, "options", where, list), field(data, "answers", where, list)
    if not questions or not len(questions) == len(options) == len(answers):
        raise EvalError(f"{where}: 'questions', 'options' and 'answers' must be non-empty lists of one length "
                        f"(got {len(questions)}, {len(options)}, {len(answers)})")
    rows = tuple(_question(q, o, a, f"{where} question {i + 1}") for i, (q, o, a)
                 in enumerate(zip(questions, options, answers)))
    article_id = str(data.get("id", where))
    return Article(article_id, level or _level_of(article_id), field(data, "article", where), rows)


def _level_of(article_id: str) -> str:
    """'high' for an id like 'high1234.txt' (the official ids name the level), else ''."""
    return next((level for level in LEVELS if article_id.startswith(level)), "")


def load_race(path: Path) -> list[Article]:
    """Articles from the official folder (searched recursively, middle/ and high/ named as levels) or JSONL."""
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix in (".txt", ".json") and p.is_file()), key=numbered_order)
        if not files:
            raise EvalError(f"{path}: no RACE article files (<n>.txt); pass the official folder (e.g. RACE/test/high) "
                            "or a JSONL file")
        mixed = next((f for f in files if {"train", "dev"} & set(f.relative_to(path).parts[:-1])), None)
        if mixed is not None:
            raise EvalError(f"{path} holds training or dev articles ({mixed}); pass the test folder (RACE/test, or "
                            "RACE/test/high for race_high)")
        return [_read_article(f, path) for f in files]
    return _articles_from_rows(path)


def _read_article(path: Path, root: Path) -> Article:
    data = read_json_object(path, "a RACE article", "article, questions, options, answers")
    level = next((part for part in reversed(path.relative_to(root.parent).parts[:-1]) if part in LEVELS), "")
    return article_from_official(data, str(path), level)


def _articles_from_rows(path: Path) -> list[Article]:
    """Official articles, EleutherAI/race articles, or ehovy/race questions grouped by article, in file order."""
    articles: list[Article] = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        if "questions" in row:
            articles.append(article_from_official(row, where))
        elif "problems" in row:
            articles.append(_eleuther_row(row, where))
        elif "question" in row:
            article = field(row, "article", where)
            question = _question(row["question"], row.get("options"), row.get("answer"), where)
            article_id = str(row.get("example_id", where))
            last = articles[-1] if articles else None
            if last and last.article == article and (last.id == article_id or "example_id" not in row):
                articles[-1] = Article(last.id, last.level, article, last.questions + (question,))
            else:
                articles.append(Article(article_id, _level_of(article_id), article, (question,)))
        else:
            raise EvalError(f"{where}: not a RACE row; give 'article' with 'questions'/'options'/'answers' (official), "
                            "'question'/'options'/'answer' (ehovy/race) or 'problems' (EleutherAI/race)")
    if not articles:
        raise EvalError(f"{path} has no RACE rows")
    return articles


def _eleuther_row(row: dict, where: str) -> Article:
    problems = row["problems"]
    if isinstance(problems, str):  # the hub stores the list as its Python repr
        try:
            problems = ast.literal_eval(problems)
        except (ValueError, SyntaxError):
            raise EvalError(f"{where}: 'problems' is not a list literal") from None
    if not isinstance(problems, list) or not problems or not all(isinstance(p, dict) for p in problems):
        raise EvalError(f"{where}: 'problems' must be a non-empty list of {{question, options, answer}}")
    questions = tuple(_question(p.get("question"), p.get("options"), p.get("answer"), f"{where} problem {i + 1}")
                      for i, p in enumerate(problems))
    return Article(str(row.get("example_id", where)), "", field(row, "article", where), questions)


def race_context(article: Article) -> str:
    """The prompt for the article's last question (the module docstring gives the format)."""
    text = "Article: " + article.article + "\n\n"
    for q in article.questions[:-1]:
        answer = q.options[q.answer]
        if q.question.endswith(_BLANK):
            text += q.question[:-len(_BLANK) + 1] + answer + "\n"  # one space before the blank stays
        else:
            text += "Question: " + q.question + "\n" + "Answer: " + answer + "\n"
    return text + article.questions[-1].question


def race_example(article: Article) -> MCExample:
    last = article.questions[-1]
    context = race_context(article)
    return MCExample(article.id, tuple((context, " " + option) for option in last.options), last.answer, last.options)


def score_race(model: Transformer, tokenizer: Tokenizer, name: str, path: Path, articles: list[Article], window: int,
               batch_size: int, progress: bool = False) -> TaskResult:
    """acc (lm-eval reports acc; acc_norm comes too) overall and per level."""
    records = score_examples(model, tokenizer, [race_example(a) for a in articles], window, batch_size, progress,
                             desc=name)
    by_level: dict[str, list[int]] = {}
    for record, article in zip(records, articles):
        record.update(level=article.level, questions_in_context=len(article.questions) - 1)
        by_level.setdefault(article.level or "unknown", []).append(record["acc"])
    details = {level: {"acc": sum(hits) / len(hits), "n": len(hits)} for level, hits in by_level.items()}
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    settings = {"template_version": VERSION, "template": TEMPLATE, "n_shot": 0,
                "examples": "one per article: its last question, the earlier ones (with answers) in the prompt",
                "normalisation": "acc: sum of option token log-probabilities (acc_norm: per character)",
                "data": str(path), "data_sha256": sha256_of(files)}
    return TaskResult(name, accuracy(records), settings, records, details if len(details) > 1 else {})


def check_level(articles: list[Article], level: str, path: Path) -> list[Article]:
    """For race_middle / race_high: refuse articles that say they belong to the other level."""
    other = [a.id for a in articles if a.level and a.level != level]
    if other:
        raise EvalError(f"{path} holds {len(other)} articles that are not {level} (e.g. {other[0]}); pass the "
                        f"{level}/ folder, or use task race for both levels")
    return articles


def load_task(name: str, path: Path, num_fewshot: int | None, limit: int | None) -> list[Article]:
    """The articles of task race, race_middle or race_high (zero-shot only)."""
    if num_fewshot:
        raise EvalError(f"{name} is evaluated zero-shot, as in the GPT-3 and LLaMA papers; drop --num-fewshot or set "
                        "it to 0")
    articles = load_race(path)
    if name != "race":
        articles = check_level(articles, name.removeprefix("race_"), path)
    return articles[:limit]
