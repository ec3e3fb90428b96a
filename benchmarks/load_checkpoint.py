"""Load time and peak memory of a ~1B-parameter checkpoint in every format, next to transformers.

    python benchmarks/load_checkpoint.py [--workdir /tmp/llamakit-bench] [--repeats 3] [--preset llama3.2-1b]

Writes random bf16 weights (the llama3.2-1b shape by default) once in each format, then loads each
in a fresh process `--repeats` times, and reports the medians: seconds until the model is ready,
seconds including one forward pass (which also touches memory-mapped weights), and peak RSS above
the process's baseline after imports. `transformers.from_pretrained` on the same safetensors folder
runs in the same way, in the same run. The page cache is warm after the first repeat for everyone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM is not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def child(kind: str, path: str) -> None:
    """Measure one load in this (fresh) process and print a JSON line."""
    import torch

    if kind == "transformers":
        from transformers import AutoModelForCausalLM
    else:
        from llamakit import load_model
    baseline = memory_kib("VmRSS") * 1024
    start = time.perf_counter()
    if kind == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    else:
        model = load_model(path)
    loaded = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    ready = time.perf_counter()
    peak = memory_kib("VmHWM") * 1024
    print(json.dumps({"load_s": loaded - start, "load_forward_s": ready - start, "peak_rss_above_baseline": peak - baseline}))


def write_checkpoints(workdir: Path, preset: str) -> dict[str, Path]:
    """The same random weights in each format (llama2.c: fp32 and plain RoPE, all it can store)."""
    import torch

    from llamakit import ModelConfig, Transformer, save_model

    paths = {"llamakit": workdir / "llamakit", "hf (llamakit)": workdir / "hf", "meta 1 shard": workdir / "meta1",
             "meta 2 shards": workdir / "meta2", "llama2c (fp32)": workdir / "model.bin"}
    if all(p.exists() for p in paths.values()):
        return paths
    config = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu").to(torch.bfloat16).init_weights()
    for label, fmt, shards in (("llamakit", "llamakit", 1), ("hf (llamakit)", "hf", 1),
                               ("meta 1 shard", "meta", 1), ("meta 2 shards", "meta", 2)):
        if not paths[label].exists():
            save_model(model, paths[label], fmt, shards=shards)
    if not paths["llama2c (fp32)"].exists():
        model.config = config.replace(rope_theta=10000.0, use_scaled_rope=False)
        save_model(model, paths["llama2c (fp32)"], "llama2c", dtype="fp32")
    return paths


def measure(kind: str, path: Path, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{kind} load failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamakit-bench"))
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = write_checkpoints(args.workdir, args.preset)
    rows = {"transformers.from_pretrained (hf)": measure("transformers", paths["hf (llamakit)"], args.repeats)}
    for label, path in paths.items():
        rows[f"llamakit load_model ({label})"] = measure("llamakit", path, args.repeats)
    reference = rows["transformers.from_pretrained (hf)"]
    print(f"\n{args.preset}, median of {args.repeats} fresh processes each\n")
    print("| loader (format) | checkpoint | load s | load+forward s | peak RSS above baseline | time vs HF | RSS vs HF |")
    print("|---|---|---|---|---|---|---|")
    disk = {f"llamakit load_model ({label})": size_on_disk(p) for label, p in paths.items()}
    disk["transformers.from_pretrained (hf)"] = size_on_disk(paths["hf (llamakit)"])
    for label, r in rows.items():
        size = disk[label]
        print(f"| {label} | {size / 2**30:.2f} GiB | {r['load_s']:.2f} | {r['load_forward_s']:.2f} | "
              f"{r['peak_rss_above_baseline'] / 2**30:.2f} GiB | {r['load_forward_s'] / reference['load_forward_s']:.2f}x | "
              f"{r['peak_rss_above_baseline'] / reference['peak_rss_above_baseline']:.2f}x |")
    if args.output:
        args.output.write_text(json.dumps({"preset": args.preset, "repeats": args.repeats, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
