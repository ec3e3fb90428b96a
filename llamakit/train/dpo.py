"""`llamakit dpo`: a model + preference pairs -> a model (or LoRA adapter) that prefers the chosen answers.

The same loop as pre- and fine-tuning with another objective (train/preference.py) and data (data/preference.py).
The reference is the model as it starts (for LoRA: the base, since the update starts at zero). Its
log-probabilities of every answer are computed once, before the first step, and stored in the run folder
(reference_logps.safetensors), so the reference costs no memory while training and a resumed run reuses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llamakit.checkpoint import load_model
from llamakit.data.preference import PreferenceDataConfig, PreferenceExamples, load_preferences
from llamakit.files import atomic_file
from llamakit.generate.chat import chat_style
from llamakit.tokenizer import check_vocab
from llamakit.train.config import CheckpointSection, RunConfig
from llamakit.train.finetune import BaseModelSection, MethodSection, apply_method, base_tokenizer, check_method
from llamakit.train.metrics import flops_per_token
from llamakit.train.parallel import Processes
from llamakit.train.preference import DPOConfig, DPOObjective, sequence_logprobs
from llamakit.train.runner import Job, loop_data, run

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PreferenceRunConfig(RunConfig):
    """What the preference methods (DPO, reward models) share: a base model, what trains, preference pairs."""

    model: BaseModelSection = field(default_factory=BaseModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)


@dataclass
class DPOCheckpoints(CheckpointSection):
    out_dir: str = "runs/dpo"


@dataclass
class DPORunConfig(PreferenceRunConfig):
    command: ClassVar[str] = "dpo"
    checkpoint: DPOCheckpoints = field(default_factory=DPOCheckpoints)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_method(self.method, ("full", "lora"), "DPO trains")


def dpo(cfg: DPORunConfig, resume: bool = False) -> Path:
    """Train with DPO and return final/: a model folder (full) or a PEFT adapter folder (lora)."""
    return run(cfg, build_job, resume)


def build_job(cfg: DPORunConfig, procs: Processes) -> Job:
    model, tokenizer, adapter, train_set, val_set = load_base_and_pairs(cfg, procs)
    reference_logps(model, train_set, val_set, cfg, procs)
    flops = flops_per_token(model.config, cfg.data.seq_len) * (1 if adapter is None else 4 / 6)
    return Job(model.train(), DPOObjective(cfg.dpo), loop_data(cfg, train_set, val_set, procs), tokenizer, flops,
               adapter=adapter, base=str(cfg.model.path))


def load_base_and_pairs(cfg: PreferenceRunConfig, procs: Processes, kind: type[PreferenceExamples] = PreferenceExamples):
    """What every preference method starts from (DPO, reward models): the base model, set to the data's chat format
    and with its method applied, its tokenizer, the method's adapter settings, and the encoded train/val pairs."""
    tokenizer = base_tokenizer(cfg.model)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=procs.device)
    check_vocab(tokenizer, model.config.vocab_size, str(cfg.model.path))
    style = chat_style(model, tokenizer, cfg.data.chat_format)
    train_set, val_set, _ = load_preferences(cfg.data, tokenizer, style, kind)
    model.config = model.config.replace(chat_format=style)
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices, a new head: the same on every process and every run
    adapter = apply_method(model, cfg.method)
    return model, tokenizer, adapter, train_set, val_set


def reference_logps(model: torch.nn.Module, train_set: PreferenceExamples, val_set: PreferenceExamples,
                    cfg: DPORunConfig, procs: Processes) -> None:
    """Attach the starting model's log p(chosen), log p(rejected) to every pair: read from the run folder, or
    computed now (every process computes the same; the first writes them)."""
    path = Path(cfg.checkpoint.out_dir) / REFERENCE_FILE
    # What the log-probabilities depend on: a file made for other data or another model is not reused.
    made_from = json.dumps([asdict(cfg.model), asdict(cfg.method), asdict(cfg.data)], sort_keys=True, default=str)
    if path.is_file():
        with safe_open(path, "pt") as f:
            same = (f.metadata() or {}).get("made_from") == made_from
        if same:
            stored = load_file(path)
            train_set.ref_logps, val_set.ref_logps = stored["train"], stored["val"]
            return
        log.warning("%s was computed for another model or data; computing it again", path)
    model.eval()
    train_set.ref_logps = _logps(model, train_set, cfg.train.micro_batch_size, procs.device)
    val_set.ref_logps = _logps(model, val_set, cfg.train.micro_batch_size, procs.device)
    if procs.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"train": train_set.ref_logps, "val": val_set.ref_logps}, str(tmp),
                      metadata={"made_from": made_from})


@torch.no_grad()
def _logps(model: torch.nn.Module, examples: PreferenceExamples, micro_batch: int, device) -> torch.Tensor:
    """(N, 2): each pair's summed log-probabilities of its chosen and its rejected answer."""
    out = []
    for start in range(0, examples.num_samples, micro_batch):
        indices = range(start, min(start + micro_batch, examples.num_samples))
        batch = examples.batch(indices)
        sums, _ = sequence_logprobs(model(batch["input_ids"].to(device)), batch["labels"].to(device))  # (2P,)
        out.append(sums.view(2, -1).t().cpu())  # (P, 2)
    return torch.cat(out)
