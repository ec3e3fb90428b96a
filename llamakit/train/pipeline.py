"""Pipeline parallelism for training: the layers split into stages over the "pp" dimension of the DeviceMesh, each
optimizer step's micro-batches flowing through them on a schedule (torch.distributed.pipelining).

Applied from outside the model, and first, in torchtitan's order (pipeline split -> tensor parallel -> activation
checkpointing -> compile -> FSDP over the "dp" sub-mesh; see parallel.parallelize):
- `split_stage` keeps this process's contiguous range of layers in a `Stage` whose parameter names are the whole
  model's (layers.N keeps its global N), so optimizer groups, checkpoints and the tensor-parallel plan see the
  names of a one-process run;
- `attach_pipeline` gives the (sharded) stage its `Pipeline`, at `stage.pipeline`, which the loop and the
  checkpointer call: one step's micro-batches forward and backward on the schedule (1F1B by default: each stage
  holds the activations of at most `pp` micro-batches, where GPipe holds all of them), the forward-only validation
  loss, the grad norm over every stage, and the full state dict gathered from the stages (or one stage's part of it).
Only the next-token loss runs through it (pretraining, full-weight fine-tuning), summed and scaled as the loop
scales it, so losses, gradients and checkpoints equal a one-process run's.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from llamakit import runtime
from llamakit.data.sft_examples import PAD_SEGMENT
from llamakit.errors import ConfigError
from llamakit.model.llama import Transformer, rope_cos_sin, rope_frequencies
from llamakit.runtime import Processes
from llamakit.train.batches import IGNORE_INDEX
from llamakit.train.config import TrainSection, accumulation_steps
from llamakit.train.objectives import Batch, NextTokenLoss, packed_mask

log = logging.getLogger(__name__)
SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
GATHERED = StateDictOptions(full_state_dict=True)  # every stage's rank keeps its whole part (gathered over dp, tp)


def stage_layers(n_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges of equal length; layers left over go to the middle stages first (the first and last
    stages also hold the embedding and the output head; Llama 3 §3.3.2 gives them a layer fewer), then the first."""
    base, extra = divmod(n_layers, stages)
    takers = set([*range(1, stages - 1), 0][:extra])  # extra < stages: the last stage never takes one
    counts = [base + (i in takers) for i in range(stages)]
    return [range(start, start + n) for start, n in zip(itertools.accumulate([0, *counts]), counts)]


class Stage(nn.Module):
    """One pipeline stage of a Transformer, made of the model's own modules under the model's names: token ids
    (B, T) into the first stage, hidden states (B, T, dim) between stages, fp32 logits (B, T, vocab) out of the last."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})  # keyed by the global layer index
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("inv_freq", model.inv_freq.clone(), persistent=False)
        self.sequence_shards = 1  # slices the hidden states come in (tensor parallel's sequence parallelism: tp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's part of Transformer.forward (training: whole sequences from position 0, no cache)."""
        first = self.embed_tokens is not None
        h = self.embed_tokens(x) if first else x  # (B, T, dim), or this process's (B, T / shards, dim)
        T = x.size(1) if first else x.size(1) * self.sequence_shards
        positions = torch.arange(T, device=h.device)  # (T,): attention sees the whole sequence
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)  # (T, D)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h)).float()  # (B, T, vocab_size)

    def _apply(self, fn, recurse=True):
        # As Transformer._apply: a cast must not turn the rotary frequencies into bf16.
        super()._apply(fn, recurse)
        self.inv_freq = rope_frequencies(self.config, device=next(self.parameters()).device)
        return self


def check_pipeline(cfg: TrainSection, procs: Processes, objective, adapter=None) -> None:
    """Refuse, before anything is split, what the pipeline cannot run, naming the setting to change."""
    if procs.pp == 1:
        return
    name = f"train.pipeline_parallel={procs.pp}"
    if type(objective) is not NextTokenLoss or adapter is not None:
        what = "an adapter" if adapter is not None else type(objective).__name__
        raise ConfigError(f"{name} runs the next-token loss of full-weight training only (pretrain; finetune with "
                          f"method full), not {what}; set train.pipeline_parallel to 1")
    if cfg.precision == "fp16":
        raise ConfigError(f"{name} does not run with train.precision=fp16 (each stage would skip steps on its own "
                          "overflows); use bf16 or fp32")
    if cfg.parallel == "ddp" and procs.dp > 1:
        raise ConfigError(f"{name}: data parallelism across pipeline stages uses FSDP; set train.parallel to fsdp "
                          "or auto")
    micro = accumulation_steps(cfg, procs.dp)
    if cfg.pipeline_schedule == "1f1b" and micro < procs.pp:
        raise ConfigError(f"train.pipeline_schedule=1f1b needs at least {procs.pp} micro-batches per step (one per "
                          f"stage) but each of the {procs.dp} data-parallel replica(s) gets {micro} (train.batch_size="
                          f"{cfg.batch_size} / micro_batch_size={cfg.micro_batch_size} / {procs.dp}); raise "
                          f"train.batch_size to {procs.pp * cfg.micro_batch_size * procs.dp}, lower "
                          "train.micro_batch_size, or set train.pipeline_schedule to gpipe")


def split_stage(model: nn.Module, procs: Processes) -> Stage:
    """This process's stage of `model` (pp_rank of the pp stages); the other stages' modules are left behind."""
    if not isinstance(model, Transformer):
        raise ConfigError(f"train.pipeline_parallel={procs.pp} splits a plain Llama model, not a "
                          f"{type(model).__name__}; set train.pipeline_parallel to 1")
    config = model.config
    if config.tie_word_embeddings:
        raise ConfigError(f"train.pipeline_parallel={procs.pp} puts the embedding and the output head on different "
                          "stages, but this model ties them (tie_word_embeddings); set train.pipeline_parallel to 1")
    if config.n_layers < procs.pp:
        raise ConfigError(f"train.pipeline_parallel={procs.pp} needs at least one layer per stage; the model has "
                          f"{config.n_layers}: lower train.pipeline_parallel")
    ranges = stage_layers(config.n_layers, procs.pp)
    mine = ranges[procs.pp_rank]
    log.info("pipeline stage %d of %d: layers %d-%d", procs.pp_rank, procs.pp, mine.start, mine.stop - 1)
    return Stage(model, mine, first=procs.pp_rank == 0, last=procs.pp_rank == procs.pp - 1)


def attach_pipeline(module: nn.Module, cfg: TrainSection, procs: Processes) -> nn.Module:
    """Give a (sharded) stage its Pipeline at module.pipeline, where the loop and the checkpointer find it."""
    if procs.pp > 1:
        # Training's tensor parallelism is sequence parallel (parallel.tensor_parallel): between blocks, and so between
        # stages, each tp rank holds a 1/tp slice of the sequence.
        module.sequence_shards = procs.tp
        module.pipeline = Pipeline(module, cfg, procs)
    return module


class Pipeline:
    """Runs this process's stage in step with the other stages of its model replica (the pp group of the mesh)."""

    def __init__(self, module: nn.Module, cfg: TrainSection, procs: Processes):
        self.module, self.procs = module, procs
        self.group = runtime.device_mesh(procs)["pp"].get_group()
        self.first, self.last = procs.pp_rank == 0, procs.pp_rank == procs.pp - 1
        self.n_microbatches = accumulation_steps(cfg, procs.dp)
        self.kind = SCHEDULES[cfg.pipeline_schedule]
        self._schedules: dict[torch.Size, object] = {}  # by input shape: stages infer what they exchange once each
        self._scale = 1.0  # of the current step's loss; read by _loss

    def peer(self, stage: int) -> int:
        """The global rank of `stage` in this process's pipeline."""
        return dist.get_global_rank(self.group, stage)

    def forward_backward(self, micro_batches: list[Batch], scale: float, autocast, device) -> dict[str, torch.Tensor]:
        """Forward and backward of a step's micro-batches (gradients accumulate; FSDP reduces after the last);
        returns the summed loss of the micro-batches, on every stage."""
        batch = _stack(micro_batches, device)  # (n * B, T) each
        kwargs = {"mask": packed_mask(batch["segment_ids"])} if "segment_ids" in batch else {}
        args = (batch["input_ids"],) if self.first else ()
        self._scale, losses = scale, []
        with autocast:
            self._schedule(batch["input_ids"].shape).step(*args, target=batch["labels"] if self.last else None,
                                                          losses=losses, return_outputs=False, **kwargs)
        if self.last:
            total = torch.stack([_whole(x.detach()) for x in losses]).sum() / scale
        else:
            total = torch.zeros((), device=device)
        return {"loss": self._from_last(total)}

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A micro-batch's summed token losses times the loop's scale (data_parallel / global weight)."""
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum * self._scale

    def _schedule(self, shape: torch.Size):
        if shape not in self._schedules:
            stage = PipelineStage(self.module, self.procs.pp_rank, self.procs.pp, self.procs.device, group=self.group)
            # scale_grads=False: the loss is a scaled sum already (see loop._step), not a mean per micro-batch.
            self._schedules[shape] = self.kind(stage, self.n_microbatches, loss_fn=self._loss, scale_grads=False)
        return self._schedules[shape]

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """The summed next-token loss of one batch (on every stage), its hidden states sent stage to stage."""
        mask = packed_mask(batch["segment_ids"]) if "segment_ids" in batch else None
        device = batch["input_ids"].device
        if self.first:
            h = self.module(batch["input_ids"], mask=mask)  # (B, T, dim), or logits with one stage
        else:
            # The shape first: with sequence parallelism each tensor-parallel rank passes on its slice (B, T/tp, dim).
            shape = torch.empty(3, dtype=torch.int64, device=device)
            dist.recv(shape, src=self.peer(self.procs.pp_rank - 1), group=self.group)
            h = torch.empty(*shape.tolist(), dtype=self._hidden_dtype(), device=device)
            dist.recv(h, src=self.peer(self.procs.pp_rank - 1), group=self.group)
            h = self.module(h, mask=mask)  # (B, T, dim) or (B, T, vocab_size)
        if not self.last:
            next_stage = self.peer(self.procs.pp_rank + 1)
            dist.send(torch.tensor(h.shape, dtype=torch.int64, device=device), dst=next_stage, group=self.group)
            dist.send(h.to(self._hidden_dtype()).contiguous(), dst=next_stage, group=self.group)
            return self._from_last(torch.zeros((), device=device))
        loss = F.cross_entropy(h.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return self._from_last(loss)

    def _hidden_dtype(self) -> torch.dtype:
        # The residual stream keeps the weights' dtype under autocast (the embedding's output plus each block's).
        return next(self.module.parameters()).dtype

    def _from_last(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value (float64) on every stage of the pipeline."""
        value = _whole(value.detach()).to(torch.float64).reshape(())
        dist.broadcast(value, src=self.peer(self.procs.pp - 1), group=self.group)
        return value

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients of every stage together by their global L2 norm, which it returns."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):  # FSDP or tensor parallel: the norm over this stage's shards
            norm = norm.full_tensor()
        squares = norm.double() ** 2
        dist.all_reduce(squares, group=self.group)  # ||g||^2 is the sum of the stages' squared norms
        total = squares.sqrt().to(norm.dtype)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def full_state(self, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
        """The whole model's weights and optimizer state (the names and order of a one-process run), on rank 0;
        ({}, None) elsewhere. Every process must call it."""
        weights = _cpu(get_model_state_dict(self.module, options=GATHERED))
        optim = _cpu(get_optimizer_state_dict(self.module, optimizer, options=GATHERED)) if optimizer else None
        if self.procs.dp_rank or self.procs.tp_rank:  # only the pipeline of rank 0 gathers its stages
            return {}, None
        parts = [None] * self.procs.pp if self.first else None
        dist.gather_object((weights, optim), parts, dst=self.peer(0), group=self.group)
        if not self.procs.is_main:
            return {}, None
        merged = {k: v for stage_weights, _ in parts for k, v in stage_weights.items()}
        return merged, _merge_optimizer_states([o for _, o in parts]) if optimizer else None

    def own_part(self, weights: dict, optim_state: dict | None) -> tuple[dict, dict | None]:
        """This stage's part of a whole model's weights and optimizer state (as full_state writes them)."""
        names = set(self.module.state_dict())
        weights = {k: v for k, v in weights.items() if k in names}
        if optim_state is None:
            return weights, None
        groups = [{**g, "params": [p for p in g["params"] if p in names]} for g in optim_state["param_groups"]]
        state = {k: v for k, v in optim_state["state"].items() if k in names}
        return weights, {"state": state, "param_groups": groups}


def _merge_optimizer_states(stages: list[dict]) -> dict:
    """One optimizer state of the stages' (keyed by parameter name): the state of each, each group's parameters in
    stage order, which is the whole model's order."""
    groups = [{**g, "params": [p for s in stages for p in s["param_groups"][i]["params"]]}
              for i, g in enumerate(stages[0]["param_groups"])]
    states = {k: v for s in stages for k, v in s["state"].items()}
    return {"state": {name: states[name] for g in groups for name in g["params"] if name in states},
            "param_groups": groups}


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor (tensor parallel's vocabulary-parallel loss is one, replicated over tp)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _cpu(tree):
    """Tensors of a (nested) state dict on the CPU, to send and save."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu(v) for v in tree]
    return tree


def _stack(micro_batches: list[Batch], device) -> Batch:
    """The micro-batches as one batch (n * B, T), shorter ones padded on the right to the longest T (padding takes
    no part in the loss and, attention being causal, changes nothing before it); the schedule splits it back."""
    T = max(b["input_ids"].size(1) for b in micro_batches)
    fill = {"labels": IGNORE_INDEX, "segment_ids": PAD_SEGMENT}  # input_ids: 0, any id
    return {k: torch.cat([F.pad(b[k], (0, T - b[k].size(1)), value=fill.get(k, 0)) for b in micro_batches]).to(device)
            for k in micro_batches[0]}
