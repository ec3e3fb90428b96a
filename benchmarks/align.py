"""Alignment speed: llamakit's DPO and reward-model training next to trl, PPO's rollout sampling next to `generate`.

    python benchmarks/align.py [--sizes 260k,15m] [--methods lora,full] [--tasks dpo,reward,rollout]
                               [--batch 4] [--seq-len 256] [--steps 6] [--warmup 2] [--threads 2]
                               [--prompts 16] [--prompt-len 128] [--new-tokens 64] [--repeats 3]
                               [--activation-checkpointing] [--assets ../shared/assets] [--json results.json]

Models: random fp32 weights (llamakit's init, benchmarks/train.py's build_theirs) saved once per size as a Hugging
Face folder that every row loads: "260k" is stories260K's shape with its 512-token tokenizer (per-step overhead
dominates there), "15m" stories15M's (dim 288, 6 layers, 6 heads) with the Llama 2 tokenizer (32000 tokens).
Data: the real HH-RLHF harmless-base test pairs, encoded by llamakit in the Llama 2 chat format, prompt + answer cut
to --seq-len + 1 tokens (data/preference.encode_pair).

Training rows, each in a fresh process (peak RSS only grows in a process), for every size, task and method:
- llamakit: `llamakit dpo` / `llamakit reward` as the CLI runs them (`dpo(cfg)`, `reward(cfg)`) on
  configs/dpo/tiny-dpo.yaml / configs/reward/tiny-reward.yaml with the benchmark's model, data, batch, steps and
  method (full: every weight trains; lora: rank 8, alpha 16, dropout 0 on all seven projections, for both tasks).
- trl: DPOTrainer with precompute_ref_log_probs=True (the reference's log-probabilities computed once before
  training, as llamakit does: the fair comparison), DPOTrainer as trl runs it by default (trl-live-ref: the
  reference forward on every batch: a second model for full, the LoRA base with the adapter off for lora), and
  RewardTrainer; LoRA through peft with the same settings (the reward model's new score head trains whole in both).
  trl gets the very token ids llamakit trains on, in the order llamakit's loop draws them (its sampler set to
  sequential), and llamakit's optimizer settings (AdamW, lr, betas, eps, weight decay, clipping, warmup); it keeps
  its own implementation choices (fused AdamW, its fused LM head). Its defaults that change the computation are set
  as in llamakit: bf16=False (fp32), gradient_checkpointing=False (--activation-checkpointing turns it on in both).
Both take --warmup + --steps + 1 optimizer steps of --batch pairs on the same (warmup + steps + 1) x batch pairs.

How to read the figures:
- "tokens": per step, the tokens of its pairs, no padding: prompt + answer of the chosen and of the rejected
  sequence. Both tools process exactly these (trl's collated attention masks and llamakit's padded batch sizes are
  checked against them), so tokens/s compare like for like; padding, which both add, is their own cost.
- "s/step": wall time between the ends of consecutive optimizer steps, everything the tool's loop does included
  (batching, forward, backward, clipping, AdamW, logging). llamakit's step ends are taken where its loop records a
  step (MetricsLog.record), trl's at its on_step_end callback. Timed: the --steps steps after --warmup; the last step
  is not timed (llamakit evaluates the validation pair there). "tokens/s": the median over timed steps of
  tokens / seconds; "s/step" the median and the spread (a wide one means the machine was busy).
- "reference pass s": DPO's one-off reference log-probabilities over all the training pairs, before step 1 (trl
  precomputed and llamakit; trl-live-ref pays this inside every step instead).
- "peak RSS": VmHWM at the end of the last timed step: interpreter, imports (trl + transformers + datasets weigh
  more than llamakit), weights, reference pass and training so far; "after imports": VmRSS once imported.
- "trainable params": what the optimizer updates (LoRA: the adapters, plus the score head of a reward model).
- "loss at step 1": DPO starts at ln 2 (policy = reference) in both; a reward model's head is random (not the
  same in the two tools).

Rollout rows (one process per size): --prompts HH-RLHF prompts (their last --prompt-len tokens) completed with
exactly --new-tokens tokens each (stopping disabled: stop_ids=frozenset() in llamakit, eos_token_id=None and
min_new_tokens in transformers), sampled at temperature 1 with no top-k/top-p filter, all prompts in one batch:
- rollout: `llamakit.train.rollout.sample_responses`, what `llamakit ppo` samples with, on the policy as training
  holds it; generate: `llamakit.generate.generate` (with the tokenizer, detokenizing as it goes) on that same model;
  generate-prepared: the same after `prepare_for_decoding` (column-major weights, as `llamakit generate` and the
  server run); transformers: `LlamaForCausalLM.generate` with left padding. Both llamakit tools reuse a KV cache made
  beforehand, as PPO does. Figures: generated tokens / the median seconds of --repeats rounds after one untimed
  round (prefill included); in each round the tools take turns, in an order rotated every round.

Targets (issue): DPO >= 1.3x trl's (precomputed reference) tokens/s at <= its peak RSS; rollout >= llamakit generate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/ is sys.path[0] when this runs as a script
from align_backends import DATA, Setup, llamakit_row, rollout_row, trl_row

ASSETS = Path(os.environ.get("LLAMAKIT_SHARED_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
SIZES = {"260k": ("stories260k", "tinyllamas/tok512.model"), "15m": ("stories15m", "llama2/tokenizer.model")}
TOOLS = {"dpo": ("llamakit", "trl", "trl-live-ref"), "reward": ("llamakit", "trl")}
ROLLOUT_TOOLS = ("rollout", "generate", "generate-prepared", "transformers")
MB = 1e6


# --- in a row's own process ----------------------------------------------------------------------------------

def run_row(spec: dict) -> dict:
    torch.set_num_threads(spec.pop("threads"))
    tool = spec.pop("tool")
    if tool == "rollout":
        return rollout_row(**{k: Path(v) if k in ("weights", "tokenizer_path", "data") else v for k, v in spec.items()})
    setup = Setup(**{k: Path(v) if k in ("weights", "tokenizer", "data", "out_dir") else v for k, v in spec.items()})
    return llamakit_row(setup) if tool == "llamakit" else trl_row(setup, live_reference=tool == "trl-live-ref")


# --- the parent: weights, a process per row, figures, tables --------------------------------------------------

def save_weights(size: str, args, folder: Path) -> None:
    """Random weights of the size's shape as a Hugging Face folder with the tokenizer file beside them."""
    from train import build_theirs
    from transformers.utils import logging

    from llamakit.model import ModelConfig

    logging.disable_progress_bar()
    preset, tokenizer = SIZES[size]
    config = ModelConfig.from_preset(preset).replace(max_seq_len=1024)  # room for any --seq-len / rollout here
    build_theirs(config, torch.device("cpu")).save_pretrained(folder)
    shutil.copy(args.assets / tokenizer, folder / "tokenizer.model")


def spawn(spec: dict, tmp: Path, threads: int) -> dict:
    """This script with --row in a fresh process, offline; its last stdout line is the row's JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1"}  # both tools' progress bars off
    command = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps({**spec, "threads": threads})]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"row {spec['tool']} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_figures(raw: dict, args) -> dict:
    """Per-step seconds from consecutive step ends; medians over the timed steps (after --warmup, before the last)."""
    ends, tokens = raw["step_ends"], raw["step_tokens"]
    timed = range(args.warmup, args.warmup + args.steps)  # step k took ends[k] - ends[k - 1]
    seconds = [ends[k] - ends[k - 1] for k in timed]
    return {**raw, "seconds": seconds, "tokens": [tokens[k] for k in timed],
            "tokens_per_s": statistics.median(tokens[k] / s for k, s in zip(timed, seconds)),
            "s_per_step": statistics.median(seconds), "peak_rss": raw["peaks"][args.warmup + args.steps - 1]}


def run_size(size: str, args, tmp: Path) -> dict[str, dict]:
    folder = tmp / f"weights-{size}"
    save_weights(size, args, folder)
    tokenizer, data = args.assets / SIZES[size][1], args.assets / DATA
    results = {}
    for task in [t for t in args.tasks if t in TOOLS]:
        for method in args.methods:
            for tool in TOOLS[task]:
                name = f"{size} {task} {method} {tool}"
                start = time.perf_counter()
                setup = Setup(task, method, folder, tokenizer, data, args.batch, args.seq_len,
                              args.warmup + args.steps + 1, args.activation_checkpointing, tmp / name.replace(" ", "-"))
                spec = {"tool": tool, **{k: str(v) if isinstance(v, Path) else v
                                         for k, v in dataclasses.asdict(setup).items()}}
                results[name] = training_figures(spawn(spec, tmp, args.threads), args)
                print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            same = {tuple(results[f"{size} {task} {method} {tool}"]["step_tokens"]) for tool in TOOLS[task]}
            assert len(same) == 1, f"{size} {task} {method}: the tools saw different tokens"
    if "rollout" in args.tasks:
        start = time.perf_counter()
        results[f"{size} rollout"] = spawn(
            {"tool": "rollout", "weights": str(folder), "tokenizer_path": str(tokenizer), "data": str(data),
             "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "repeats": args.repeats}, tmp, args.threads)
        print(f"{size} rollout: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return results


# --- tables ---------------------------------------------------------------------------------------------------

def comparisons(results: dict[str, dict], args) -> list[dict]:
    """llamakit next to each reference: (what, llamakit row, reference row, tokens/s and peaks, ratios)."""
    rows = []
    for size in args.sizes:
        for task in [t for t in args.tasks if t in TOOLS]:
            for method in args.methods:
                ours = results[f"{size} {task} {method} llamakit"]
                for tool in TOOLS[task][1:]:
                    ref = results[f"{size} {task} {method} {tool}"]
                    rows.append({"size": size, "what": f"{task} {method}", "llamakit": "llamakit", "reference": tool,
                                 "ours_tps": ours["tokens_per_s"], "ref_tps": ref["tokens_per_s"],
                                 "ours_peak": ours["peak_rss"], "ref_peak": ref["peak_rss"]})
        if "rollout" in args.tasks:
            tps = results[f"{size} rollout"]["tokens_per_s"]
            for tool in ROLLOUT_TOOLS[1:]:
                rows.append({"size": size, "what": "rollout generation", "llamakit": "rollout (sample_responses)",
                             "reference": tool, "ours_tps": tps["rollout"], "ref_tps": tps[tool]})
    for row in rows:
        row["speed_ratio"] = row["ours_tps"] / row["ref_tps"]
        if "ours_peak" in row:
            row["memory_ratio"] = row["ours_peak"] / row["ref_peak"]
    return rows


def table(headers: list[str], lines: list[list[str]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")
    print(flush=True)


def print_tables(results: dict[str, dict], compared: list[dict]) -> None:
    mb = lambda r, k: f"{r[k] / MB:.0f}" if k in r else ""  # noqa: E731
    table(["size", "what", "llamakit", "reference", "llamakit tokens/s", "reference tokens/s", "tokens/s ratio",
           "llamakit peak RSS MB", "reference peak RSS MB", "peak ratio"],
          [[c["size"], c["what"], c["llamakit"], c["reference"], f"{c['ours_tps']:.0f}", f"{c['ref_tps']:.0f}",
            f"{c['speed_ratio']:.2f}x", mb(c, "ours_peak"), mb(c, "ref_peak"),
            f"{c['memory_ratio']:.2f}x" if "memory_ratio" in c else ""] for c in compared])
    training = {n: r for n, r in results.items() if "step_ends" in r}
    if training:
        table(["row", "trainable params", "tokens/step", "s/step median (min-max)", "tokens/s", "reference pass s",
               "after imports MB", "peak RSS MB", "loss at step 1", "threads"],
              [[name, f"{r['trainable']:,}", f"{statistics.median(r['tokens']):.0f}",
                f"{r['s_per_step']:.3f} ({min(r['seconds']):.3f}-{max(r['seconds']):.3f})", f"{r['tokens_per_s']:.0f}",
                "" if r["reference_seconds"] is None else f"{r['reference_seconds']:.2f}", mb(r, "rss_after_imports"),
                mb(r, "peak_rss"), "" if r["first_loss"] is None else f"{r['first_loss']:.4f}", str(r["threads"])]
               for name, r in training.items()])
    rollouts = {n: r for n, r in results.items() if "new_tokens" in r}
    if rollouts:
        table(["size", "tool", "prompts x new tokens", "s median (min-max)", "generated tokens/s", "threads"],
              [[name.split()[0], tool, f"{r['prompts']} x {r['new_tokens']}",
                f"{statistics.median(r['seconds'][tool]):.3f} ({min(r['seconds'][tool]):.3f}-"
                f"{max(r['seconds'][tool]):.3f})", f"{r['tokens_per_s'][tool]:.0f}", str(r["threads"])]
               for name, r in rollouts.items() for tool in ROLLOUT_TOOLS])


def print_targets(compared: list[dict]) -> None:
    for c in compared:
        if c["what"].startswith("dpo") and c["reference"] == "trl":
            met = c["speed_ratio"] >= 1.3 and c["memory_ratio"] <= 1.0
            print(f"- {c['size']} {c['what']}: {c['speed_ratio']:.2f}x trl's tokens/s at {c['memory_ratio']:.2f}x its "
                  f"peak RSS; target (>= 1.3x at <= 1.0x) {'met' if met else 'NOT met'}")
        if c["what"] == "rollout generation" and c["reference"] == "generate":
            print(f"- {c['size']} rollout: {c['speed_ratio']:.2f}x llamakit generate on the same batch; target (>= 1x) "
                  f"{'met' if c['speed_ratio'] >= 1.0 else 'NOT met'}")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "trl", "peft"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="See the module docstring (top of this file) for what each row measures.")
    p.add_argument("--sizes", default="260k,15m", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--methods", default="lora,full", help="comma-separated, of lora, full")
    p.add_argument("--tasks", default="dpo,reward,rollout", help="comma-separated, of dpo, reward, rollout")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step (2x sequences)")
    p.add_argument("--seq-len", type=int, default=256, help="data.seq_len: prompt + answer tokens, at most")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training row (medians reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in every row")
    p.add_argument("--activation-checkpointing", action="store_true", help="on in both tools (trl's default)")
    p.add_argument("--prompts", type=int, default=16, help="rollout: prompts sampled together")
    p.add_argument("--prompt-len", type=int, default=128, help="rollout: each prompt's last tokens, at most")
    p.add_argument("--new-tokens", type=int, default=64, help="rollout: tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="rollout: timed rounds (the median is reported)")
    p.add_argument("--assets", type=Path, default=ASSETS, help="the shared assets folder")
    p.add_argument("--json", "--output", dest="json", help="write all figures as JSON")
    p.add_argument("--row", help="internal: run the row this JSON describes here and print its figures")
    args = p.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return
    args.sizes, args.methods, args.tasks = (v.split(",") for v in (args.sizes, args.methods, args.tasks))
    for name, values, allowed in (("sizes", args.sizes, SIZES), ("methods", args.methods, ("lora", "full")),
                                  ("tasks", args.tasks, ("dpo", "reward", "rollout"))):
        if set(values) - set(allowed):
            p.error(f"--{name}: unknown {sorted(set(values) - set(allowed))}; choose from {', '.join(allowed)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (a step is timed from the end of the one before)")
    print(f"{versions()}; {args.threads} threads, fp32; DPO/reward: {args.batch} pairs per step, seq_len "
          f"{args.seq_len}, median of {args.steps} steps after {args.warmup}; rollout: {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, median of {args.repeats}; load average {os.getloadavg()[0]:.2f} at the start\n",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        results = {k: v for size in args.sizes for k, v in run_size(size, args, Path(tmp)).items()}
    compared = comparisons(results, args)
    print_tables(results, compared)
    print_targets(compared)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "comparisons": compared, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
