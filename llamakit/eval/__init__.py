"""Evaluation: multiple choice by log-likelihood, MMLU, closed-book QA and perplexity, with versioned prompts.

The lm-evaluation-harness adapter (`llamakit.eval.harness`) is imported only on request: lm_eval is optional.
"""

from llamakit.eval.mmlu import evaluate_mmlu
from llamakit.eval.multiple_choice import TaskResult, score_examples
from llamakit.eval.perplexity import Perplexity, text_perplexity
from llamakit.eval.qa import evaluate_qa, exact_match, normalize_answer
from llamakit.eval.results import RunLog, format_table
from llamakit.eval.runner import EvalOptions, prepare, resolve_path, run_tasks, task_names
from llamakit.eval.scoring import Score, encode_pair, greedy_answers, score_pairs
from llamakit.eval.tasks import TASKS, MCExample

__all__ = ["TASKS", "EvalOptions", "MCExample", "Perplexity", "RunLog", "Score", "TaskResult", "encode_pair",
           "evaluate_mmlu", "evaluate_qa", "exact_match", "format_table", "greedy_answers", "normalize_answer",
           "prepare", "resolve_path", "run_tasks", "score_examples", "score_pairs", "task_names", "text_perplexity"]
