"""Fine-tuning memory and speed: llamakit full / LoRA next to transformers full / transformers + peft LoRA.

    python benchmarks/finetune.py [--config 110m] [--batch 4] [--seq-len 256] [--steps 6] [--warmup 1]
                                  [--rows llamakit-full,transformers-full,llamakit-lora,peft-lora]
                                  [--dtype fp32|bf16] [--threads N] [--output results.json]

The parent process builds a transformers LlamaForCausalLM with random weights (llamakit's init, the
`--config` shape from benchmarks/train.py; "110m" is llama2.c's stories110M: dim 768, 12 layers, 12
heads, 32000-token vocabulary, tied embeddings) and saves it to a temporary folder. Each row then runs
in a fresh process of its own (this script with --row), because peak RSS only ever grows in a process:

- llamakit-full / llamakit-lora[-all]: `llamakit.load_model(folder)`, then, as `llamakit finetune`
  does, everything set to train, or `apply_lora` (on q_proj,v_proj, or on every projection), then
  llamakit's real loop with `build_optimizer` (AdamW over the parameters that require grad only) and
  NextTokenLoss.
- transformers-full / peft-lora[-all]: `LlamaForCausalLM.from_pretrained(folder)`, for LoRA wrapped by
  `peft.get_peft_model` with the same LoRA settings, then forward(labels) -> backward -> clip -> AdamW
  step -> zero_grad, the optimizer over the parameters that require grad only.

Same batch (--batch x --seq-len random tokens, the targets the next tokens), same AdamW (lr 3e-4, betas
0.9/0.95, eps 1e-5, weight decay 0.1, clipping at 1.0), LoRA rank 8, alpha 16, dropout 0.05 (alpaca-
lora's), same dtype and number of threads. Before training, every row computes the loss of the batch;
all must agree to 1e-4 (same weights, and LoRA's B starts at zero), or the parent stops.

How to read the table:
- "after load": the process's RSS (VmRSS) once imports are done and the model is loaded and prepared
  and every weight read once (both stacks memory-map the file, so weights page in only when used). It
  includes the interpreter and imports ("after imports"; transformers + peft weigh more than llamakit)
  and the fp32 weights (110M x 4 bytes = 0.44 GB).
- "training overhead": peak RSS during warm-up and timed steps (VmHWM, reset after loading via
  /proc/self/clear_refs) minus "after load": weight gradients + AdamW state (2 x 4 bytes per trainable
  parameter, also listed as "optimizer state") + activations kept for backward + temporaries (logits
  and their gradient: batch x seq x 32000 x 4 bytes each). This is what LoRA saves on: frozen weights get
  no gradient and no optimizer state, while activations remain. glibc malloc may keep freed memory, so
  these are upper bounds on what a step needs, measured the same way for every row.
- "peak RSS": the largest RSS of the whole process, loading included (what a machine must provide).
- "tokens/s": batch x seq-len / the median seconds of --steps optimizer steps after --warmup steps
  (each step: forward, backward, clip, AdamW). LoRA still runs the full forward and the backward through
  every frozen layer (to reach the earlier adapters), skipping only the frozen weights' gradients: about
  4N instead of 6N FLOPs per token, so expect about 1.5x full fine-tuning's speed (a little more, as
  AdamW's pass over 110M parameters goes too), not more. On CPU, matrix multiplies bound both stacks.
  "s/step min-max" shows the spread of the timed steps: a wide one means the machine was busy.
- "vs ref": llamakit / its reference (full -> transformers-full, LoRA -> peft-lora with the same
  targets); memory below 1 and speed above 1 favour llamakit. Rows run one after another, so a busy
  moment on a shared machine hits one row only: check the load average printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/ is sys.path[0] when this runs as a script: reuse train.py's configs, optimizer settings and rows
from train import CONFIGS, OPTIM, build_theirs, hf_loss, make_batches, start_llamakit, start_transformers

# row -> (stack, LoRA targets or None for full fine-tuning); the first four run by default
ROWS = {
    "llamakit-full": ("llamakit", None),
    "transformers-full": ("transformers", None),
    "llamakit-lora": ("llamakit", ("q_proj", "v_proj")),
    "peft-lora": ("transformers", ("q_proj", "v_proj")),
    "llamakit-lora-all": ("llamakit", "all-linear"),
    "peft-lora-all": ("transformers", "all-linear"),
}
REFERENCE = {"llamakit-full": "transformers-full", "llamakit-lora": "peft-lora", "llamakit-lora-all": "peft-lora-all"}
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16.0, 0.05
MB = 1e6


def memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


@torch.no_grad()
def touch_weights(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once. Both stacks memory-map the safetensors file, so until
    something reads the weights they are not in RSS; without this "after load" would leave them out
    and the training overhead would count them."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.sum()


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0), so that the next peak is the training's own."""
    Path("/proc/self/clear_refs").write_text("5")


# --- one row, in its own process -----------------------------------------------------------------------

def load_llamakit(folder: Path, targets):
    """The model as `llamakit finetune` prepares it: loaded (frozen), then all trainable, or LoRA applied."""
    from llamakit import load_model
    from llamakit.model.lora import LoRAConfig, apply_lora

    model = load_model(folder)
    if targets is None:
        model.requires_grad_(True)
    else:
        torch.manual_seed(0)  # LoRA's A matrices
        apply_lora(model, LoRAConfig(LORA_RANK, LORA_ALPHA, LORA_DROPOUT, tuple(targets.split()) if
                                     isinstance(targets, str) else targets))
    return model.train()


def load_transformers(folder: Path, targets):
    """transformers' model from the same folder; for LoRA wrapped by peft with the same settings."""
    import peft  # noqa: F401  (imported for every transformers row, so their baselines compare)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    if targets is not None:
        lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                               target_modules=targets if targets == "all-linear" else list(targets),
                               task_type="CAUSAL_LM")
        torch.manual_seed(0)
        model = peft.get_peft_model(model, lora)
    return model.train()


@torch.no_grad()
def initial_loss(stack: str, model, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token loss of the batch before any step: must be the same for every row."""
    if stack == "transformers":
        return float(hf_loss(model, batch))
    from llamakit.train.objectives import NextTokenLoss

    objective = NextTokenLoss()
    return float(objective.loss(model, batch)[0]) / objective.weight(batch)


def optimizer_numbers(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(parameters the optimizer updates, bytes of its state: AdamW's two moments per parameter)."""
    params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return params, state


def run_row(name: str, folder: Path, args) -> dict:
    """Load, prepare, warm up and time one row in this process; returns its figures."""
    stack, targets = ROWS[name]
    if stack == "transformers":
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import llamakit.model.lora  # noqa: F401
        import llamakit.train.loop  # noqa: F401
    after_imports = memory_bytes("VmRSS")
    model = (load_llamakit if stack == "llamakit" else load_transformers)(folder, targets)
    touch_weights(model)
    after_load, load_peak = memory_bytes("VmRSS"), memory_bytes("VmHWM")
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = CONFIGS[args.config].replace(max_seq_len=args.seq_len)
    batches = make_batches(config.vocab_size, args.batch, args.seq_len)
    loss0 = initial_loss(stack, model, batches[0])
    reset_peak_rss()

    device = torch.device("cpu")
    if stack == "llamakit":
        row = start_llamakit(config, batches, args, device, compile=False, precision=args.dtype, model=model)
    else:
        row = start_transformers(config, batches, args, device, compile=False, precision=args.dtype, theirs=model)
    seconds = [row.step() for _ in range(args.steps)]
    train_peak = memory_bytes("VmHWM")
    optimized, state_bytes = optimizer_numbers(row.parts["optimizer"])
    assert optimized == trainable, f"{name}: the optimizer holds {optimized} parameters, {trainable} train"
    return {"row": name, "threads": torch.get_num_threads(), "params": total, "trainable": trainable,
            "optimizer_state_bytes": state_bytes, "rss_after_imports": after_imports, "rss_after_load": after_load,
            "training_overhead": train_peak - after_load, "peak_rss": max(load_peak, train_peak),
            "tokens_per_s": args.batch * args.seq_len / statistics.median(seconds), "step_seconds": seconds,
            "initial_loss": loss0, "last_loss": row.loss}


# --- the parent: weights once, a process per row, the table ---------------------------------------------

def save_weights(args, folder: Path) -> None:
    """Random weights of the chosen shape as a Hugging Face folder, which every row loads."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = CONFIGS[args.config].replace(max_seq_len=args.seq_len)
    build_theirs(config, torch.device("cpu")).save_pretrained(folder)


def spawn_row(name: str, folder: Path, args) -> dict:
    """This script with --row in a fresh process; its last stdout line is the row's JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--weights", str(folder),
               "--config", args.config, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"row {name} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = {  # header -> cell of a row's figures
    "trainable params": lambda r: f"{r['trainable']:,}",
    "trainable": lambda r: f"{100 * r['trainable'] / r['params']:.3f}%",
    "optimizer state MB": lambda r: f"{r['optimizer_state_bytes'] / MB:.1f}",
    "after imports MB": lambda r: f"{r['rss_after_imports'] / MB:.0f}",
    "after load MB": lambda r: f"{r['rss_after_load'] / MB:.0f}",
    "training overhead MB": lambda r: f"{r['training_overhead'] / MB:.0f}",
    "peak RSS MB": lambda r: f"{r['peak_rss'] / MB:.0f}",
    "tokens/s": lambda r: f"{r['tokens_per_s']:.0f}",
    "s/step min-max": lambda r: f"{min(r['step_seconds']):.1f}-{max(r['step_seconds']):.1f}",
    "loss first -> last": lambda r: f"{r['initial_loss']:.4f} -> {r['last_loss']:.4f}",
}
RATIOS = {"overhead vs ref": "training_overhead", "peak vs ref": "peak_rss", "tokens/s vs ref": "tokens_per_s"}


def ratio(results: dict[str, dict], name: str, key: str) -> str:
    """llamakit's figure over its reference's, for the llamakit rows whose reference ran."""
    reference = results.get(REFERENCE.get(name, ""))
    return f"{results[name][key] / reference[key]:.2f}x" if reference else ""


def print_table(results: dict[str, dict]) -> None:
    headers = ["row", *COLUMNS, *RATIOS]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for name, r in results.items():
        cells = [name, *(cell(r) for cell in COLUMNS.values()), *(ratio(results, name, k) for k in RATIOS.values())]
        print("| " + " | ".join(cells) + " |", flush=True)


def run_all(args) -> dict[str, dict]:
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    config = CONFIGS[args.config]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, config {args.config} "
          f"({config.num_params() / 1e6:.0f}M parameters), batch {args.batch} x {args.seq_len} tokens, median of "
          f"{args.steps} steps after {args.warmup}; LoRA rank {LORA_RANK}, alpha {LORA_ALPHA:g}, dropout "
          f"{LORA_DROPOUT}; load average {os.getloadavg()[0]:.2f} at the start\n", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(args, Path(tmp))
        for name in names:
            start = time.perf_counter()
            results[name] = spawn_row(name, Path(tmp), args)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    losses = [r["initial_loss"] for r in results.values()]
    assert max(losses) - min(losses) < 1e-4, f"the rows start from different losses: {losses}"
    print_table(results)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="See the module docstring (top of this file) for how to read the figures.")
    p.add_argument("--config", default="110m", choices=list(CONFIGS), help="model shape, from benchmarks/train.py")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, caches)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, fp32 master weights")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads in every row")
    p.add_argument("--rows", default=",".join(list(ROWS)[:4]), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--output", help="write all figures as JSON")
    p.add_argument("--row", choices=list(ROWS), help="internal: run this one row here and print its JSON")
    p.add_argument("--weights", type=Path, help="internal, with --row: the Hugging Face folder to load")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(run_row(args.row, args.weights, args)))
        return
    results = run_all(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "optim": vars(OPTIM), "rows": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
