"""Model parallelism on one machine: tokens/s and peak memory per process of `llamakit pretrain` under torchrun, for
each layout of 1, 2 and 4 processes (FSDP, tensor parallel, pipeline parallel, TP x FSDP, PP x DP).

    python benchmarks/parallel.py [--preset stories110m] [--steps 4] [--batch-size 8] [--micro-batch-size 2]
                                  [--seq-len 128] [--layouts 1,fsdp2,tp2,pp2,fsdp4,tp4,pp4,tp2xfsdp2,pp2xdp2]
                                  [--threads 2] [--output parallel.json]

Every layout trains the same model (a preset, random init, seed 0) on the same data (tinyshakespeare from
../shared/assets, tokenized with the Llama 2 tokenizer, prepared once into a cache folder) with the same global
batch, so every row computes the same losses (checked: each row's losses must equal the 1-process row's within
1e-4). The machine's --threads are shared: one process uses them all, N processes get threads/N each (at least
1, so 4 processes on 2 cores oversubscribe; the table says so). tokens/s is the median over the steps after the
first. "peak RSS" is the largest resident set of any process of the job over its whole life (getrusage of the
reaped children, one job per wrapper process): loading included, when every process builds the whole model
before it is split, and the ~0.3 GB every PyTorch process pays to import torch. "training steps" is the
largest peak of any process during the training steps alone (the loop's `peak_memory_gb` metric: Linux's
VmHWM, reset when training starts), which is what the layout changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLAMAKIT_SHARED_ASSETS", REPO.parent / "shared" / "assets"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamakit" / "bench-parallel"
# name: (processes, tensor_parallel, pipeline_parallel, data-parallel kind)
LAYOUTS = {
    "1": (1, 1, 1, "fsdp"), "fsdp2": (2, 1, 1, "fsdp"), "tp2": (2, 2, 1, "fsdp"), "pp2": (2, 1, 2, "fsdp"),
    "fsdp4": (4, 1, 1, "fsdp"), "tp4": (4, 4, 1, "fsdp"), "pp4": (4, 1, 4, "fsdp"),
    "tp2xfsdp2": (4, 2, 1, "fsdp"), "pp2xdp2": (4, 1, 2, "fsdp"),
}
# Runs one torchrun job and reports the peak resident set of any of its processes (they are all reaped children).
WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(code)
"""


def prepared_data() -> Path:
    """tinyshakespeare as llamakit shards, tokenized with the Llama 2 tokenizer (32k vocabulary), made once."""
    data = CACHE / "data"
    if (data / "meta.json").is_file():
        return data
    corpus, tokenizer = ASSETS / "corpus" / "tinyshakespeare_input.txt", ASSETS / "llama2" / "tokenizer.model"
    if not corpus.is_file() or not tokenizer.is_file():
        sys.exit(f"benchmarks/parallel.py needs {corpus} and {tokenizer} (../shared/assets)")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "llamakit", "prepare", str(corpus), "--tokenizer", str(tokenizer),
                    "--output", str(data), "--separator", "\n\n", "--val-fraction", "0.02"], check=True)
    return data


def config_file(preset: str, out: Path) -> Path:
    """configs/pretrain/tiny.yaml's recipe with the model of `preset`, untied (the output head its own matrix, as in
    Llama 1/2/3: pipeline stages cannot share one between the first and the last)."""
    config = yaml.safe_load((REPO / "configs" / "pretrain" / "tiny.yaml").read_text())
    config["model"] = {"preset": preset, "tie_word_embeddings": False}
    path = out / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_layout(name: str, args, data: Path, out: Path) -> dict:
    nproc, tp, pp, kind = LAYOUTS[name]
    threads = max(1, args.threads // nproc)
    launcher = ([] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                        "--master_port", str(29700 + len(name))])
    command = [sys.executable, *launcher, "-m", "llamakit", "pretrain", str(config_file(args.preset, out)),
               "--data.path", str(data), "--data.seq_len", str(args.seq_len), "--train.batch_size", str(args.batch_size),
               "--train.micro_batch_size", str(args.micro_batch_size), "--train.max_steps", str(args.steps),
               "--train.device", "cpu", "--train.tensor_parallel", str(tp), "--train.pipeline_parallel", str(pp),
               "--train.parallel", kind, "--eval.every", "0", "--eval.batches", "4", "--checkpoint.every", "0",
               "--log.tensorboard", "false", "--log.plot", "false", "--optim.warmup_steps", "2",
               "--checkpoint.out_dir", str(out / name)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"layout {name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    return {"layout": name, "processes": nproc, "tp": tp, "pp": pp, "dp": nproc // (tp * pp), "threads": threads,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
            "peak_rss_gb": int(done.stdout.split()[-1]) / 2**30, "losses": [r["loss"] for r in steps],
            "step_peak_gb": max(r.get("peak_memory_gb", float("nan")) for r in steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="stories110m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--output")
    args = p.parse_args()
    data = prepared_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            rows.append(run_layout(name, args, data, Path(tmp)))
            row, base = rows[-1], rows[0]
            drift = max(abs(a - b) for a, b in zip(row["losses"], base["losses"]))
            speed = row["tokens_per_s"] / base["tokens_per_s"]
            print(f"{name:>10}  {row['processes']} proc  tp {row['tp']} pp {row['pp']} dp {row['dp']}  "
                  f"{row['threads']} thr/proc  {row['tokens_per_s']:8.1f} tok/s ({speed:.2f}x)"
                  f"  peak RSS/proc {row['peak_rss_gb']:.2f} GB (training steps {row['step_peak_gb']:.2f} GB)"
                  f"  loss drift {drift:.1e}", flush=True)
            if drift > 1e-4:
                raise SystemExit(f"layout {name}: losses differ from {base['layout']}'s by {drift:.2e}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
