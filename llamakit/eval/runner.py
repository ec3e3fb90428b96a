"""Run a list of tasks: every data file is resolved and read first, so bad input fails before any scoring.

Then each task is scored and recorded as soon as it finishes: a failure or an interrupt keeps the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamakit.errors import EvalError
from llamakit.eval import code, math_tasks, mmlu, qa, race
from llamakit.eval.multiple_choice import ACC_NORM, TaskResult, accuracy, score_examples
from llamakit.eval.perplexity import text_perplexity
from llamakit.eval.readers import labels_beside, read_lines, sha256_of
from llamakit.eval.results import RunLog
from llamakit.eval.sandbox import Limits
from llamakit.eval.scoring import TOKENIZATION
from llamakit.eval.tasks import TASKS, MCTask
from llamakit.model import Transformer
from llamakit.tokenizer import Tokenizer

# task -> (subfolder under --data-dir, file names looked for inside a folder); the multiple-choice tasks add theirs
LOCATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mmlu": ("mmlu", ()),  # the folder itself: dev/ and test/
    "nq": ("nq", ("NQ-open.dev.jsonl", "dev.jsonl", "test.jsonl")),
    "triviaqa": ("triviaqa", ("dev.jsonl", "test.jsonl")),
    "perplexity": ("perplexity", ("text.txt",)),
    "race": ("race/test", ()),  # the official RACE/test folder (middle/ and high/), or --data race=FILE.jsonl
    "race_middle": ("race/test/middle", ()),
    "race_high": ("race/test/high", ()),
    "gsm8k": ("gsm8k", ("test.jsonl",)),
    "math": ("math/test", ()),  # the official MATH/test folder: <subject>/<n>.json
    "humaneval": ("humaneval", ("HumanEval.jsonl.gz", "HumanEval.jsonl")),
    "mbpp": ("mbpp", ("mbpp.jsonl",)),
    **{name: (task.folder, task.files) for name, task in TASKS.items()},
}
Runner = Callable[[Transformer], TaskResult]


@dataclass(frozen=True)
class EvalOptions:
    """What every task shares: the window, batch size, example limit, shots override, perplexity stride."""

    window: int
    batch_size: int = 16
    limit: int | None = None
    num_fewshot: int | None = None
    stride: int | None = None
    progress: bool = False
    samples: int = 0  # gsm8k, math: k sampled solutions per problem for maj@k (0: greedy only)
    temperature: float = 0.6
    seed: int = 0
    pass_k: tuple[int, ...] = (1,)  # humaneval, mbpp: the k of pass@k (at most the samples per problem)
    timeout: float = 3.0  # humaneval, mbpp: wall-clock seconds per program in the sandbox
    workers: int | None = None  # humaneval, mbpp: programs run at once (default: the CPU count)


def task_names(text: str) -> list[str]:
    """Comma-separated task names, checked against the known tasks."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOCATIONS]
    if unknown or not names:
        raise EvalError(f"unknown task {', '.join(unknown) or repr(text)}; choose from {', '.join(sorted(LOCATIONS))}")
    return list(dict.fromkeys(names))


def resolve_path(name: str, given: Path | None, data_dir: Path | None) -> Path:
    """The data file (or MMLU folder) of a task: --data TASK=PATH, else DATA_DIR/<its folder>."""
    folder, files = LOCATIONS[name]
    path = given if given is not None else (data_dir / folder if data_dir is not None else None)
    if path is None:
        raise EvalError(f"no data for task {name}: pass --data {name}=PATH or --data-dir DIR (holding {folder}/)")
    if not path.exists():
        raise EvalError(f"data for task {name} not found: {path} does not exist; pass --data {name}=PATH")
    if path.is_dir() and files:
        found = next((path / f for f in files if (path / f).is_file()), None)
        if found is None:
            raise EvalError(f"{path} holds none of {', '.join(files)} for task {name}; pass the file with "
                            f"--data {name}=FILE")
        return found
    return path


def prepare(name: str, path: Path, tokenizer: Tokenizer, opts: EvalOptions) -> Runner:
    """Read and check a task's data now; return what scores it with a model later."""
    if name == "mmlu":
        shots = 5 if opts.num_fewshot is None else opts.num_fewshot
        examples, meta = mmlu.load_examples(tokenizer, path, shots, opts.window, opts.limit)
        return lambda model: mmlu.score_mmlu(model, tokenizer, path, examples, meta, opts.window, opts.batch_size,
                                             shots, opts.progress)
    if name in ("nq", "triviaqa"):
        shots = 1 if opts.num_fewshot is None else opts.num_fewshot
        questions = qa.load_qa(path)[:opts.limit]
        return lambda model: qa.score_qa(model, tokenizer, name, path, questions, opts.window, opts.batch_size, shots,
                                         opts.progress)
    if name in ("race", "race_middle", "race_high"):
        articles = race.load_task(name, path, opts.num_fewshot, opts.limit)
        return lambda model: race.score_race(model, tokenizer, name, path, articles, opts.window, opts.batch_size,
                                             opts.progress)
    if name in math_tasks.TASKS:
        task, sampling = math_tasks.TASKS[name], math_tasks.Sampling(opts.samples, opts.temperature, opts.seed)
        shots, problems = math_tasks.shots_for(task, opts.num_fewshot), math_tasks.load_task(task, path, opts.limit)
        return lambda model: math_tasks.score_math(model, tokenizer, task, path, problems, opts.window,
                                                   opts.batch_size, shots, sampling, opts.progress)
    if name in code.TASKS:
        return _code(name, path, tokenizer, opts)
    if name == "perplexity":
        text = "\n".join(read_lines(path))
        return lambda model: _perplexity(model, tokenizer, path, text, opts)
    if opts.num_fewshot:
        raise EvalError(f"{name} is evaluated zero-shot, as in the LLaMA paper; drop --num-fewshot or set it to 0")
    task = TASKS[name]
    examples = task.load(path)[:opts.limit]
    if not examples:
        raise EvalError(f"{path} has no examples for task {name}; pass the task's data file")
    return lambda model: _multiple_choice(model, tokenizer, task, path, examples, opts)


def _multiple_choice(model, tokenizer, task: MCTask, path: Path, examples, opts: EvalOptions) -> TaskResult:
    records = score_examples(model, tokenizer, examples, opts.window, opts.batch_size, opts.progress, desc=task.name)
    settings = {"template_version": task.version, "template": task.template, "n_shot": 0,
                "normalisation": ACC_NORM, "data": str(path), "data_sha256": sha256_of(_data_files(path))}
    return TaskResult(task.name, accuracy(records), settings, records)


def _data_files(path: Path) -> list[Path]:
    """A data file and, where the official release keeps labels apart (PIQA, SIQA), its labels file."""
    labels = labels_beside(path)
    return [path, labels] if labels.is_file() else [path]


def _code(name: str, path: Path, tokenizer: Tokenizer, opts: EvalOptions) -> Runner:
    """HumanEval or MBPP: problems read and settings checked now; generation and the sandboxed tests later."""
    if opts.num_fewshot is not None and opts.num_fewshot != code.TASKS[name].n_shot:
        raise EvalError(f"{name} uses its published {code.TASKS[name].n_shot}-shot prompt; drop --num-fewshot")
    task, limits = code.TASKS[name], Limits(timeout=opts.timeout)
    sampling = code.code_sampling(opts.samples, opts.temperature, opts.seed, opts.pass_k)
    problems = task.load(path)[:opts.limit]
    return lambda model: code.score_code(model, tokenizer, task, path, problems, opts.window, opts.batch_size,
                                         sampling, opts.pass_k, limits, opts.workers, opts.progress)


def _perplexity(model, tokenizer, path: Path, text: str, opts: EvalOptions) -> TaskResult:
    stride = opts.stride or opts.window
    result = text_perplexity(model, tokenizer, text, opts.window, stride, opts.batch_size, opts.progress)
    settings = {"window": opts.window, "stride": stride, "data": str(path), "data_sha256": sha256_of([path]),
                "normalisation": "token_perplexity = exp(NLL / tokens predicted, BOS excluded); byte_perplexity = "
                "exp(NLL / UTF-8 bytes); bits_per_byte = NLL / bytes / ln 2 (line ends read as \\n)"}
    return TaskResult("perplexity", result.as_dict(), settings)


def run_settings(opts: EvalOptions, **extra) -> dict:
    """The run-wide settings recorded in the results file."""
    return {"window": opts.window, "batch_size": opts.batch_size, "limit": opts.limit,
            "num_fewshot": opts.num_fewshot, "tokenization": TOKENIZATION, "acc_norm": ACC_NORM, **extra}


def run_tasks(model: Transformer, runners: Sequence[tuple[str, Runner]], log: RunLog) -> list[TaskResult]:
    """Score each prepared task and add it to the log as it finishes; on any failure (or Ctrl-C) the log keeps
    the finished tasks, records the one that stopped with `status: failed` and the error, and the error propagates."""
    for name, runner in runners:
        try:
            log.add(runner(model))
        except KeyboardInterrupt:
            log.fail(name, "interrupted")
            raise
        except BaseException as e:
            log.fail(name, str(e) or type(e).__name__)
            raise
    log.finish()
    return log.results
