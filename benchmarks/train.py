"""Training throughput and MFU: llamakit's loop next to transformers.LlamaForCausalLM under a plain AdamW loop.

    python benchmarks/train.py [--configs 15m,110m] [--batch-size 8] [--seq-len 256] [--steps 10] [--warmup 3]
                               [--rows transformers,transformers-compiled,llamakit,llamakit-compiled]
                               [--experiments] [--keep-freed-memory] [--sequential] [--threads N] [--output x.json]
    python benchmarks/train.py --device cuda --dtype bf16 --configs 1b --sequential      # on a GPU

Every row starts from the same random weights (llamakit's init, copied into the transformers model) and
trains on the same random tokens, one micro-batch of --batch-size x --seq-len per optimizer step, with
AdamW (lr 3e-4, betas 0.9/0.95, eps 1e-5, weight decay 0.1) and gradient clipping at 1.0. llamakit runs
its real loop (`llamakit.train.loop.train`, as `llamakit pretrain` does, minus data files, checkpoints
and metrics files) after `parallelize`, which compiles each block when `compile` is on; transformers runs
forward(labels) -> backward -> clip -> step -> zero_grad, eager and under `torch.compile`. Before timing,
both compute the loss of the first batch and must agree to 1e-4. Each row first takes --warmup steps
(compilation happens there); then the rows take their --steps timed steps in turn, one each, so that a
busy moment on a shared machine slows every row alike (--sequential: one row after another, freeing
each; use it when all the models do not fit in memory at once, e.g. 110m with --experiments, or 1b).
Figures are medians. MFU = tokens/s x training FLOPs per token / peak FLOP/s, with llamakit's own
definitions (`train.metrics`): on CPU the peak is a measured 1024x1024 matmul, the best seen in the run.
"MB paged in" counts minor page faults: memory a step touches for the first time, which on CPU is
mostly large temporaries (logits and their gradients) that malloc unmapped when they were freed;
--keep-freed-memory tells glibc's malloc to keep such memory instead, in this process (every row).

Then one llamakit-compiled step is split into the blocks' forward+backward, the output projection +
cross-entropy (forward+backward) and clip + AdamW, each with its FLOP rate, and profiled per operator,
to show what bounds the speed. --experiments adds rows that change llamakit from outside (whole-model
compile, model + loss as one compiled graph, fused AdamW, bf16 autocast on CPU) to show which changes pay.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llamakit.checkpoint.hf import config_to_hf
from llamakit.data.sft_examples import IGNORE_INDEX
from llamakit.model import ModelConfig, Transformer
from llamakit.train.config import OptimSection, TrainSection
from llamakit.train.loop import LoopData, LoopSettings, train
from llamakit.train.metrics import MetricsLog, flops_per_token, peak_flops
from llamakit.train.objectives import NextTokenLoss
from llamakit.train.optim import build_optimizer, param_groups
from llamakit.train.parallel import init_processes, keep_freed_memory, parallelize
from llamakit.train.state import Checkpointer, TrainState

CONFIGS = {  # ~15M and ~110M: the tinyllamas shapes; ~1B: TinyLlama-1.1B's shape (GQA, 32k vocabulary)
    "15m": ModelConfig.from_preset("stories15m"),
    "110m": ModelConfig.from_preset("stories110m"),
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632),
}
OPTIM = OptimSection(lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, grad_clip=1.0)
ROWS = ("transformers", "transformers-compiled", "llamakit", "llamakit-compiled")  # the reference first
EXPERIMENTS = ("whole model compiled", "model + loss compiled", "fused AdamW", "bf16 autocast")


class StepLog(MetricsLog):
    """A MetricsLog that writes nothing and keeps every step's values (the loop's own tokens/s)."""

    def __init__(self):
        super().__init__(Path("unused"), enabled=False, start_step=0, max_steps=0, tensorboard=False)
        self.steps: list[dict] = []

    def record(self, step: int, values: dict[str, float], show: bool = False) -> None:
        self.steps.append(values)


# --- models and data ---------------------------------------------------------------------------------------

def build_ours(config: ModelConfig, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model.to(device)


def build_theirs(config: ModelConfig, device: torch.device):
    """transformers' model holding a copy of llamakit's initial weights (same names, minus the `model.` prefix)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    hf_config = LlamaConfig(**config_to_hf(config, torch.float32), attn_implementation="sdpa")
    with no_init_weights():
        theirs = LlamaForCausalLM(hf_config)
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in build_ours(config, "cpu").state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)  # copies: the two models share nothing
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()  # tied configs: point lm_head at the embedding just loaded
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == config.tie_word_embeddings
    return theirs.to(device).train()


def make_batches(vocab_size: int, batch: int, seq_len: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random tokens: inputs and their next tokens (B, seq_len) each."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(3, vocab_size, (batch, seq_len + 1), generator=g)  # (B, T + 1)
        batches.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return batches


def hf_loss(theirs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own mean loss; shift_labels: the labels are already next tokens, so it must not shift again."""
    return theirs(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"],
                  use_cache=False).loss


@torch.no_grad()
def check_same_loss(config: ModelConfig, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """Both models' fp32 loss on the first batch: equal work only if they compute the same function."""
    ours, theirs = build_ours(config, device), build_theirs(config, device)
    batch = {k: v.to(device) for k, v in batch.items()}
    objective = NextTokenLoss()
    a = float(objective.loss(ours, batch)[0]) / objective.weight(batch)
    b = float(hf_loss(theirs, batch))
    assert abs(a - b) < 1e-4, f"initial losses differ: llamakit {a:.6f}, transformers {b:.6f}"
    return a


# --- the rows: each warms up, then steps one optimizer step at a time ------------------------------------

class Row:
    """A model mid-training: step() runs one more optimizer step and returns its seconds (loss in .loss)."""

    def __init__(self, step: Callable[[], tuple[float, float]], **parts):
        self._step, self.parts, self.loss = step, parts, float("nan")
        self.seconds: list[float] = []  # of the timed steps
        self.faults: list[int] = []  # minor page faults of each timed step: memory touched for the first time
        self.probes: dict[str, Callable[[], float]] = {}  # parts of a step to time alone, in the same rounds
        self.part_seconds: dict[str, list[float]] = {}

    def step(self) -> float:
        seconds, self.loss = self._step()
        return seconds


def start_llamakit(config: ModelConfig, batches, args, device, compile: bool, precision: str,
                   objective=None, optimizer_fn: Callable | None = None, whole_model: bool = False,
                   model: torch.nn.Module | None = None) -> Row:
    """llamakit's real loop, continued one step at a time; the seconds are the loop's own (from its tokens/s).
    `model`: train this one (e.g. loaded, with LoRA applied) instead of a fresh build_ours(config)."""
    procs = init_processes(str(device))
    model = model if model is not None else build_ours(config, device)
    model = parallelize(model, TrainSection(compile=compile and not whole_model), procs)
    if whole_model:
        model.compile()
    optimizer = (optimizer_fn or build_optimizer)(model, OPTIM)
    objective = objective or NextTokenLoss()
    data = LoopData(train_step=lambda step: [batches[step % len(batches)]], val_batches=[])
    settings = LoopSettings(max_steps=0, grad_clip=OPTIM.grad_clip, precision=precision, eval_every=0,
                            save_every=0, log_every=10**9)
    log, state = StepLog(), TrainState()
    checkpointer = Checkpointer(Path("unused"), 1, procs, None, "")  # never called: save_every=0

    def step() -> tuple[float, float]:
        settings.max_steps = state.step + 1
        train(model, objective, optimizer, lambda step: OPTIM.lr, data, settings, state, checkpointer, log)
        values = log.steps[-1]
        return batches[0]["labels"].numel() / values["tokens_per_s"], values["loss"]

    row = Row(step, model=model, optimizer=optimizer, objective=objective)
    for _ in range(args.warmup):
        row.step()
    return row


def start_transformers(config: ModelConfig, batches, args, device, compile: bool, precision: str,
                       theirs=None) -> Row:
    """forward(labels) -> backward -> clip -> AdamW step -> zero_grad, timed like llamakit's loop.
    `theirs`: train this model (e.g. loaded, or wrapped by peft) instead of a fresh build_theirs(config);
    only its parameters that require grad go to the optimizer."""
    theirs = theirs if theirs is not None else build_theirs(config, device)
    model = torch.compile(theirs) if compile else theirs
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                  weight_decay=OPTIM.weight_decay)
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    steps = itertools.count()

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batches[next(steps) % len(batches)].items()}
        with autocast:
            loss = hf_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the device, as llamakit's loop does when it reads the loss
        return time.perf_counter() - start, loss

    row = Row(step, model=theirs, optimizer=optimizer)
    for _ in range(args.warmup):
        row.step()
    return row


def fused_adamw(model, cfg: OptimSection) -> torch.optim.AdamW:
    """llamakit's AdamW with fused=True (one kernel per step over all tensors; CPU has it since torch 2.4)."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def compiled_loss_objective() -> NextTokenLoss:
    """NextTokenLoss with the whole model + cross-entropy as one compiled graph."""
    objective = NextTokenLoss()
    objective.loss = torch.compile(objective.loss)
    return objective


def rows_for(args) -> dict[str, tuple[str, Callable]]:
    """Row label -> (precision, function(config, batches, device) -> a warmed-up Row)."""
    def ours(precision=args.dtype, **kw):
        return precision, lambda c, b, d: start_llamakit(c, b, args, d, precision=precision, **kw)

    def theirs(compile):
        return args.dtype, lambda c, b, d: start_transformers(c, b, args, d, compile, args.dtype)

    rows = {"transformers": theirs(False), "transformers-compiled": theirs(True),
            "llamakit": ours(compile=False), "llamakit-compiled": ours(compile=True)}
    rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    if args.experiments:
        rows.update({
            "llamakit, whole model compiled": ours(compile=True, whole_model=True),
            "llamakit, model + loss compiled": ours(compile=False, objective=compiled_loss_objective()),
            "llamakit-compiled, fused AdamW": ours(compile=True, optimizer_fn=fused_adamw),
        })
        if args.dtype == "fp32" and args.device == "cpu":
            rows["llamakit-compiled, bf16 autocast"] = ours(precision="bf16", compile=True)
    return rows


# --- what bounds it ----------------------------------------------------------------------------------------

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")  # SDPA kernels


def part_probes(row: Row, batch: dict[str, torch.Tensor], precision: str, device) -> dict[str, Callable]:
    """Parts of a step to time alone, each a function returning its seconds: forward+backward of the
    whole model, and of the output projection + CE only (what Transformer.forward and NextTokenLoss do
    after the last block). They leave gradients behind: zero them before the row's next step."""
    model, objective = row.parts["model"], row.parts["objective"]
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    B, T = batch["input_ids"].shape
    hidden = torch.randn(B, T, model.config.dim, device=device, requires_grad=True)  # (B, T, dim)
    weight = model.lm_head.weight

    def forward_backward():
        with autocast:
            objective.loss(model, batch)[0].backward()

    def head():
        with autocast:
            _head_loss(model.norm(hidden).flatten(0, 1), weight, batch["labels"].flatten()).backward()

    return {"forward_backward": functools.partial(seconds_of, forward_backward, device),
            "head": functools.partial(seconds_of, head, device)}


def _head_loss(hidden, weight, labels):
    """What Transformer.forward and NextTokenLoss do after the final norm: output projection, summed CE."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def seconds_of(fn: Callable, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def optimizer_seconds(row: Row, device: torch.device, repeats: int) -> float:
    """Median seconds of clip + AdamW step (after a forward+backward has left gradients)."""
    model, optimizer = row.parts["model"], row.parts["optimizer"]

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        optimizer.step()

    seconds = statistics.median(seconds_of(clip_and_step, device) for _ in range(repeats))
    optimizer.zero_grad(set_to_none=True)
    return seconds


def profile_step(row: Row, device: torch.device) -> dict:
    """Self time per operator over one step of the real loop (compiled kernels count toward their region)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = row.step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages()}  # seconds
    return {"wall_s": wall, "matmul_s": sum(ops.get(k, 0.0) for k in MATMULS),
            "attention_s": sum(v for k, v in ops.items() if k.startswith(ATTENTION)),
            "top": sorted(ops.items(), key=lambda kv: -kv[1])[:8]}


def _cell(seconds: float, step: float, peak: float, flops: float | None = None) -> str:
    rate = f", {flops / seconds / 1e9:.0f} GFLOP/s = {100 * flops / seconds / peak:.0f}%" if flops else ""
    return f"{1e3 * seconds:.0f} ms ({100 * seconds / step:.0f}%{rate})"


def print_bounds(summaries: list[dict], args, peak: float) -> None:
    """Where a llamakit-compiled step goes, the heaviest operators, and a few sentences of conclusion."""
    print("\nWhere one llamakit-compiled step goes (each part timed alone; GFLOP/s against the peak above):\n")
    print("| config | step | blocks fwd+bwd | output projection + CE fwd+bwd | clip + AdamW | loop, data, rest |")
    print("|---|---|---|---|---|---|")
    tokens = args.batch_size * args.seq_len
    for s in summaries:
        config, p = CONFIGS[s["config"]], s["parts"]
        head_flops = 6 * config.vocab_size * config.dim * tokens  # 2 forward + 4 backward per weight and token
        blocks_flops = s["flops_per_token"] * tokens - head_flops
        step = p["step"]
        s["derived"] = {"blocks_s": p["forward_backward"] - p["head"], "blocks_flops": blocks_flops,
                        "head_flops": head_flops, "rest_s": step - p["forward_backward"] - p["optimizer"]}
        cells = [_cell(s["derived"]["blocks_s"], step, peak, blocks_flops), _cell(p["head"], step, peak, head_flops),
                 _cell(p["optimizer"], step, peak), _cell(s["derived"]["rest_s"], step, peak)]
        print(f"| {s['config']} | {1e3 * step:.0f} ms | " + " | ".join(cells) + " |")
    print("\nHeaviest operators of one profiled step (self time; compiled kernels count toward their region):\n")
    for s in summaries:
        prof = s["profile"]
        top = ", ".join(f"{name} {1e3 * t:.0f} ms" for name, t in prof["top"])
        print(f"- {s['config']} ({1e3 * prof['wall_s']:.0f} ms profiled): matrix multiplies "
              f"{100 * prof['matmul_s'] / prof['wall_s']:.0f}%, attention {100 * prof['attention_s'] / prof['wall_s']:.0f}%; "
              f"{top}")
    print("\nConclusion:")
    for s in summaries:
        config, p, d = CONFIGS[s["config"]], s["parts"], s["derived"]
        ratio = next((r.get("vs_transformers") for r in s["rows"] if r["row"] == "llamakit-compiled"), None)
        paged = next((r["paged_in_bytes_per_step"] for r in s["rows"] if r["row"] == "llamakit-compiled"), 0.0)
        print(f"- {s['config']}: llamakit-compiled {tokens / p['step']:.0f} tokens/s"
              + (f" = {ratio:.2f}x transformers eager" if ratio else "")
              + f"; 100% MFU would be {peak / s['flops_per_token']:.0f}. Matrix multiplies take "
              f"{100 * s['profile']['matmul_s'] / s['profile']['wall_s']:.0f}% of a profiled step. The "
              f"{config.vocab_size}-word output projection + cross-entropy is "
              f"{100 * d['head_flops'] / tokens / s['flops_per_token']:.0f}% of the FLOPs and "
              f"{100 * p['head'] / p['step']:.0f}% of the time ({100 * d['head_flops'] / p['head'] / peak:.0f}% of "
              f"peak), the blocks run at {100 * d['blocks_flops'] / d['blocks_s'] / peak:.0f}% of peak, clip + AdamW "
              f"take {100 * p['optimizer'] / p['step']:.0f}%; each step pages in {paged / 1e6:.0f} MB of fresh memory"
              + (" (freed large temporaries that malloc unmapped: compare --keep-freed-memory)." if paged > 1e8 else "."))


# --- main --------------------------------------------------------------------------------------------------

def run_config(name: str, args, device, peaks: dict[str, float]) -> dict:
    config = CONFIGS[name].replace(max_seq_len=args.seq_len)
    batches = make_batches(config.vocab_size, args.batch_size, args.seq_len)
    summary = {"config": name, "params": config.num_params(), "flops_per_token": flops_per_token(config, args.seq_len),
               "initial_loss": check_same_loss(config, batches[0], device), "rows": []}
    torch.compiler.reset()  # a fresh compile cache per config: other shapes would mark dimensions dynamic
    plan, rows = rows_for(args), {}
    for label, (precision, start) in plan.items():
        try:
            rows[label] = start(config, batches, device)
            if label == "llamakit-compiled":
                rows[label].probes = part_probes(rows[label], batches[0], precision, device)
            if args.sequential:
                take_turns({label: rows[label]}, args.steps, device, peaks)
                finish_row(summary, label, plan, rows, device, peaks, args)
                gc.collect()  # this row's model and optimizer state, before the next one is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        except Exception as e:  # e.g. a transformers graph that torch.compile cannot trace: report, go on
            print(f"| {name} | {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |",
                  flush=True)
            if args.verbose:
                traceback.print_exc()
            summary["rows"].append({"row": label, "error": f"{type(e).__name__}: {e}"})
            rows.pop(label, None)
    if rows:  # all the rows, in turn (--sequential has done them one by one)
        take_turns(rows, args.steps, device, peaks)
    for label in list(rows):
        finish_row(summary, label, plan, rows, device, peaks, args)
    return summary


def take_turns(rows: dict[str, Row], steps: int, device, peaks: dict[str, float]) -> None:
    """`steps` rounds of one step per row (and one run of each part probe); the peak is re-measured each round."""
    for _ in range(steps):
        for row in rows.values():
            faults = minor_faults()
            row.seconds.append(row.step())
            row.faults.append(minor_faults() - faults)
            for part, probe in row.probes.items():
                row.part_seconds.setdefault(part, []).append(probe())
            if row.probes:
                row.parts["optimizer"].zero_grad(set_to_none=True)  # the probes' gradients
        for precision in peaks:
            peaks[precision] = max(peaks[precision], measure_peak(device, precision, tries=1))


def minor_faults() -> int:
    """Page faults this process has taken without disk I/O: each maps a fresh page (4 KiB) of memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def finish_row(summary: dict, label: str, plan, rows: dict, device, peaks, args) -> None:
    """Print and record a timed row, break the compiled llamakit step into parts, and free the model."""
    row, precision = rows.pop(label), plan[label][0]
    tokens = args.batch_size * args.seq_len
    tokens_per_s = tokens / statistics.median(row.seconds)
    reference = next((r["tokens_per_s"] for r in summary["rows"] if r["row"] == "transformers"), None)
    if label == "transformers":
        reference = tokens_per_s
    record = {"row": label, "precision": precision, "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * summary["flops_per_token"] / peaks[precision], "loss_at_last_step": row.loss,
              "paged_in_bytes_per_step": statistics.median(row.faults) * resource.getpagesize()}
    if reference:
        record["vs_transformers"] = tokens_per_s / reference
    summary["rows"].append(record)
    print(f"| {summary['config']} | {label} | {tokens_per_s:.0f} | "
          + (f"{record['vs_transformers']:.2f}x" if reference else "")
          + f" | {100 * record['mfu']:.1f}% | {record['paged_in_bytes_per_step'] / 1e6:.0f} | {row.loss:.4f} |",
          flush=True)
    if label == "llamakit-compiled":
        summary["parts"] = {"step": statistics.median(row.seconds),
                            **{part: statistics.median(s) for part, s in row.part_seconds.items()}}
        row.probes["forward_backward"]()  # gradients for AdamW to read (its work does not depend on their values)
        summary["parts"]["optimizer"] = optimizer_seconds(row, device, repeats=max(3, args.steps // 2))
        summary["profile"] = profile_step(row, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="15m,110m", help=f"comma-separated, of {','.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, caches)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, fp32 master weights")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sequential", action="store_true",
                   help="time one row after another, freeing each (less memory) instead of taking steps in turn")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc malloc: keep freed memory for reuse rather than unmapping it (affects every row)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    p.add_argument("--experiments", action="store_true", help="add rows changing llamakit from outside: "
                   + ", ".join(EXPERIMENTS))
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failed row")
    p.add_argument("--output", help="write all figures as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    peaks = {name: measure_peak(device, name) for name in ("fp32", "bf16")
             if name == args.dtype or (args.experiments and device.type == "cpu")}
    how = "published dense bf16" if device.type == "cuda" else "measured 1024x1024 matmul, the best of 3 x 5"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, "
          + ("malloc keeps freed memory, " if args.keep_freed_memory else "") + "batch "
          f"{args.batch_size} x {args.seq_len} tokens, median of {args.steps} steps after {args.warmup}; peak "
          + ", ".join(f"{peak / 1e12:.3f} TFLOP/s {name}" for name, peak in peaks.items()) + f" at the start ({how})\n")
    print("| config | row | tokens/s | vs transformers | MFU | MB paged in per step | loss at last step |")
    print("|---|---|---|---|---|---|---|")
    summaries = [run_config(name, args, device, peaks) for name in args.configs.split(",")]
    if device.type == "cpu":
        print("\nPeak used for MFU (the best measured during the run): "
              + ", ".join(f"{peak / 1e12:.3f} TFLOP/s {name}" for name, peak in peaks.items()))
    if all("parts" in s for s in summaries):
        print_bounds(summaries, args, peaks[args.dtype])
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"peaks": peaks, "args": vars(args), "configs": summaries}, f, indent=2)


def measure_peak(device: torch.device, precision: str, tries: int = 3) -> float:
    """llamakit's peak (what `llamakit pretrain` divides by), the best of `tries`: one can land on a busy moment."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return max(peak_flops(device, dtype, None) for _ in range(tries))


if __name__ == "__main__":
    main()
