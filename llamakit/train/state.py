"""Training checkpoints: `step-N/` folders holding everything an exact resume needs, written atomically.

A step folder is also a normal model folder (config.json, model.safetensors, tokenizer.model), so
`llamakit generate --checkpoint runs/x/step-500` works; next to the weights lie optimizer.pt (AdamW's
moments and step counts), trainer.pt (step, tokens seen, RNG and grad-scaler states) and the config.
The data position is the step itself: batches are a pure function of the step (see batches.py).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llamakit.checkpoint import read_checkpoint
from llamakit.checkpoint.io import atomic_directory
from llamakit.checkpoint.peft import read_adapter_weights, write_adapter
from llamakit.checkpoint.save import write_native
from llamakit.errors import CheckpointError
from llamakit.model.transforms import applied
from llamakit.tokenizer import Tokenizer
from llamakit.train.parallel import Processes, unwrap

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step-(\d+)")
FINAL = "final"  # the finished model, a normal model folder
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on CPU


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # tokens processed (Objective.tokens), over all processes


class Checkpointer:
    """Saves, finds, loads and prunes the step-N/ checkpoints of one run folder."""

    def __init__(self, out_dir: str | Path, keep_last: int, procs: Processes, tokenizer: Tokenizer | None,
                 config_yaml: str, adapter=None, base: str | None = None):
        self.out_dir, self.keep_last, self.procs = Path(out_dir), keep_last, procs
        self.tokenizer, self.config_yaml = tokenizer, config_yaml
        self.adapter, self.base = adapter, base  # adapter runs save only the adapter (PEFT format), not the base

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, state: TrainState) -> Path | None:
        """Write step-N/ (every process gathers; rank 0 writes), then drop the oldest beyond keep_last."""
        folder = self.out_dir / f"step-{state.step}"
        self._write(folder, model, optimizer, scaler, state)
        if self.procs.is_main:
            for old in step_dirs(self.out_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return folder

    def save_final(self, model: nn.Module) -> Path:
        """final/: a normal model folder (weights, config, tokenizer) that generate and Llama.build load."""
        folder = self.out_dir / FINAL
        self._write(folder, model, None, None, None, overwrite=True)
        _barrier()
        return folder

    def _write(self, folder: Path, model, optimizer, scaler, state: TrainState | None, overwrite=False) -> None:
        inner = unwrap(model)
        if getattr(inner, "pipeline", None) is not None:  # pipeline parallel: every stage's part, named as one model
            weights, optim_state = inner.pipeline.full_state(optimizer)
        else:
            weights = get_model_state_dict(inner, options=FULL)
            optim_state = get_optimizer_state_dict(inner, optimizer, options=FULL) if optimizer is not None else None
        if not self.procs.is_main:
            return
        with atomic_directory(folder, overwrite=overwrite) as tmp:
            for sub, prefix, part in parts(inner)[:1 if state is None else None]:  # final/: the first part only
                own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
                target = tmp / sub
                target.mkdir(exist_ok=True)
                if self.adapter is not None:
                    write_adapter(target, part, self.adapter, own, None if sub else self.base)
                    if self.tokenizer is not None:  # the base may be a llama2.c file without one beside it
                        shutil.copyfile(self.tokenizer.path, target / "tokenizer.model")
                else:
                    write_native(target, part.config, {k: v.contiguous() for k, v in own.items()}, self.tokenizer,
                                 [t.to_dict() for t in applied(part)])  # e.g. a reward model's head: loads as one
            (tmp / "train_config.yaml").write_text(self.config_yaml)
            if state is not None:
                torch.save(optim_state, tmp / "optimizer.pt")
                torch.save({"step": state.step, "tokens_seen": state.tokens_seen, "rng": _rng_states(),
                            "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "trainer.pt")
        log.info("saved %s", folder)

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> TrainState:
        """Restore weights, optimizer, scaler and RNG from step-N/ (every process reads the files)."""
        inner = unwrap(model)
        try:
            weights = {}
            for sub, prefix, part in parts(inner):
                if self.adapter is not None:
                    own = read_adapter_weights(folder / sub, part)
                else:
                    _, own = read_checkpoint(folder / sub)  # our own names (the files use Hugging Face's)
                weights.update({prefix + k: v for k, v in own.items()})
            optim_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
            trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged file: OSError, safetensors or unpickling errors
            raise CheckpointError(f"{folder}: cannot resume from it ({e}); delete this folder to resume from "
                                  "the one before") from None
        if getattr(inner, "pipeline", None) is not None:  # pipeline parallel: this stage's part of the whole model
            weights, optim_state = inner.pipeline.own_part(weights, optim_state)
        options = StateDictOptions(full_state_dict=True, strict=self.adapter is None)
        try:
            set_model_state_dict(inner, weights, options=options)
        except RuntimeError as e:
            raise CheckpointError(f"{folder}: its weights do not fit this model ({str(e).splitlines()[0]}); "
                                  "resume with the config the run started with") from None
        set_optimizer_state_dict(inner, optimizer, optim_state, options=options)
        if scaler is not None and trainer["scaler"] is not None:
            scaler.load_state_dict(trainer["scaler"])
        _set_rng_states(trainer["rng"])
        return TrainState(step=int(trainer["step"]), tokens_seen=int(trainer["tokens_seen"]))


def parts(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """What a checkpoint of model holds, as (sub-folder, state-dict prefix, module): the model itself, or the parts
    of a model made of several (PPO's policy and value model; final/ holds the first only)."""
    return model.checkpoint_parts() if hasattr(model, "checkpoint_parts") else [("", "", model)]


def step_dirs(out_dir: Path) -> list[Path]:
    """The complete step-N/ folders of a run, oldest first (incomplete ones are never renamed into place)."""
    if not out_dir.is_dir():
        return []
    steps = [p for p in out_dir.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / "trainer.pt").is_file()]
    return sorted(steps, key=step_of)


def step_of(folder: Path) -> int:
    """N of a step-N/ folder."""
    return int(STEP_DIR.fullmatch(folder.name)[1])


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
