"""Results: a JSON file rewritten atomically after every task (so finished tasks survive a later failure) and a table."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from llamakit.eval.multiple_choice import TaskResult
from llamakit.files import write_atomic

FORMAT_VERSION = 2  # 2: per-task status (and error), records count n_chars (lm-eval's acc_norm) not n_bytes
_HEADLINE = ("acc", "acc_norm", "acc_macro", "em", "maj@k", "token_perplexity", "byte_perplexity", "bits_per_byte")
_COUNT = {"token_perplexity": "tokens", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}  # the n of a metric


class RunLog:
    """The settings of a run and each finished task's result; `save` writes them to `path` (if any)."""

    def __init__(self, settings: dict, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.data = {"format_version": FORMAT_VERSION, "status": "running",
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "settings": settings, "results": {}}
        self.results: list[TaskResult] = []
        self.save()

    def add(self, result: TaskResult) -> None:
        """Record a finished task and write the file at once."""
        self.results.append(result)
        self.data["results"][result.name] = {"status": "complete", "metrics": result.metrics, "settings": result.settings,
                                             **({"subjects": result.details} if result.details else {}),
                                             "examples": result.records}
        self.save()

    def fail(self, name: str, error: str) -> None:
        """Record the task that stopped the run (`status: failed` and the error) and mark the run failed;
        the finished tasks stay."""
        self.data["results"][name] = {"status": "failed", "error": error}
        self.finish(failed=True)

    def finish(self, failed: bool = False) -> None:
        """Mark the run complete (or failed) and write the file."""
        self.data["status"] = "failed" if failed else "complete"
        self.data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.save()

    def save(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.data)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside path, then rename it over path: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_table(results: list[TaskResult]) -> str:
    """A plain-text table: one row per task (and per MMLU subject), with its headline metrics and counts."""
    rows = [("task", "metric", "value", "± stderr", "n")]
    for result in results:
        m = result.metrics
        pass_at = [k for k in m if k.startswith("pass@") and not k.endswith("_stderr")]  # code tasks: any k
        for key in [k for k in _HEADLINE if k in m] + pass_at:
            stderr = m.get(f"{key}_stderr")
            rows.append((result.name, key, _cell(m[key]), "" if stderr is None else _cell(stderr),
                         str(m.get(_COUNT.get(key, "n"), ""))))
        for subject, d in sorted(result.details.items()):
            rows.append((f"  {subject}", "acc", _cell(d["acc"]), "", str(d["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)
