"""Online serving: `llamakit serve` next to llama.cpp's `llama-server` under the same load, in the same run.

    python benchmarks/serve.py [--configs 15m,110m] [--concurrency 1,8,32] [--input-len 128] [--output-len 64]
                               [--num-prompts N] [--request-rate inf] [--output results.json]
    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --model NAME [--concurrency 8]  # any one server

A load generator in the manner of vLLM's `bench serve`: a fixed set of prompts (random token ids, so both
servers see exactly --input-len tokens) goes to /v1/completions, streaming, greedy, with `ignore_eos` so
every request yields exactly --output-len tokens; at most --concurrency requests are in flight, and with a
finite --request-rate they arrive as a Poisson process. From the stream's timestamps: TTFT (time to first
token), TPOT (time per output token after the first), ITL (the gaps between streamed tokens) and E2EL
(end-to-end latency), plus request and output-token throughput.

The main mode builds random-weight models (the tinyllamas shapes, the real Llama 2 tokenizer), writes each
also as GGUF f32 with llama.cpp's own converter, and for every concurrency starts each server in turn
(fp32, N = concurrency batch slots / --parallel slots, continuous batching, 2 threads) on a free loopback
port, warms it with N requests of its own, sends the same requests to each and stops it (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the sibling llama_cpp module, however this script is run
import llama_cpp  # noqa: E402
from serve_backends import SERVERS, VOCAB_SIZE, Server, make_checkpoint  # noqa: E402

BOS = 1  # both servers take token ids as given; a real prompt starts with <s>, so these do too


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from sending to the first streamed text
    latency: float = 0.0  # seconds from sending to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    output_tokens: int = 0
    text: str = ""


def make_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` ids: <s> then random ids above the three special tokens."""
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, vocab_size) for _ in range(length - 1)] for _ in range(n)]


async def send(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """One streamed completion, timed chunk by chunk."""
    result, chunks, start = RequestResult(), 0, time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])[:200]
                    return result
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                text = (data.get("choices") or [{}])[0].get("text")
                if text:
                    now = time.perf_counter()
                    if chunks:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - start
                    chunks, last, result.text = chunks + 1, now, result.text + text
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks  # a server without usage in streams: one chunk a token
    result.ok = chunks > 0
    result.error = "" if result.ok else "the stream held no text"
    return result


async def run_load(base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                   request_rate: float = float("inf"), api_key: str | None = None, seed: int = 0
                   ) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most `concurrency` in flight, arriving at `request_rate`/s (Poisson); return the
    results in prompt order and the wall time from the first send to the last answer."""
    gate, rng = asyncio.Semaphore(concurrency), random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A fresh connection per request: llama-server sometimes closes a kept-alive connection just as the next
    # request reuses it ("Server disconnected without sending a response"); a loopback connect costs ~0.1 ms.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=600) as client:

        async def one(prompt: list[int]) -> RequestResult:
            async with gate:
                return await send(client, "/v1/completions", completion_body(model, prompt, output_len))

        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def completion_body(model: str, prompt: list[int], output_len: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vLLM's figures: throughputs, and mean/median/p99 of TTFT, TPOT, ITL and E2EL in milliseconds."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    summary = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
               "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
               "output_tokens": out_tokens, "errors": sorted({r.error for r in results if not r.ok})[:5]}
    series = {"ttft": [r.ttft for r in done], "e2el": [r.latency for r in done],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
              "itl": [gap for r in done for gap in r.itl]}
    for name, values in series.items():
        ms = np.asarray(values or [float("nan")]) * 1000
        summary |= {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                    f"p99_{name}_ms": float(np.percentile(ms, 99))}
    return summary


def benchmark_server(server: Server, prompts: list[list[int]], warmup: list[list[int]], args
                     ) -> tuple[dict, list[str]]:
    """Warm a started server with one full batch of other prompts (one-off allocations and code paths), then
    measure; the texts let two servers be compared."""
    asyncio.run(run_load(server.url, server.model_name, warmup, args.output_len, server.slots))
    results, duration = asyncio.run(run_load(server.url, server.model_name, prompts, args.output_len,
                                             server.slots, args.request_rate, seed=args.seed))
    return summarize(results, duration), [r.text for r in results]


def compare_servers(args) -> list[dict]:
    """For each config and concurrency, every server in turn on the same prompts."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs.split(","):
        ckpt = make_checkpoint(config, workdir, args.tokenizer)
        gguf = llama_cpp.convert_to_gguf(ckpt, workdir / f"{config}-f32.gguf")
        for concurrency in map(int, args.concurrency.split(",")):
            n = args.num_prompts or max(8, 4 * concurrency)
            prompts = make_prompts(n + concurrency, args.input_len, VOCAB_SIZE, seed=args.seed + concurrency)
            row = {"config": config, "concurrency": concurrency, "num_prompts": n, "servers": {}}
            texts = {}
            for name in args.servers.split(","):
                log = workdir / f"{name}-{config}-c{concurrency}.log"
                extra = shlex.split(args.server_args.get(name, ""))
                with SERVERS[name](ckpt, gguf, concurrency, args.input_len + args.output_len, log, extra) as server:
                    figures, texts[name] = benchmark_server(server, prompts[concurrency:], prompts[:concurrency], args)
                row["servers"][name] = {**figures, "exit_code": server.exit_code}
                print(f"{config} c={concurrency} {name}: {brief(row['servers'][name])}", flush=True)
            row["same_text"] = same_text(texts)
            rows.append(row)
    return rows


def same_text(texts: dict[str, list[str]]) -> float | None:
    """Fraction of requests whose greedy outputs agree across servers (fp32 on both: nearly all should)."""
    outputs = list(texts.values())
    if len(outputs) < 2:
        return None
    return sum(len(set(group)) == 1 for group in zip(*outputs)) / len(outputs[0])


def brief(s: dict) -> str:
    return (f"{s['output_throughput']:.1f} out tok/s, {s['request_throughput']:.2f} req/s, TTFT "
            f"{s['median_ttft_ms']:.0f} ms, TPOT {s['median_tpot_ms']:.1f} ms, p99 ITL {s['p99_itl_ms']:.1f} ms, "
            f"{s['failed']} failed" + (f" ({'; '.join(s['errors'])})" if s["errors"] else ""))


def table(rows: list[dict], names: list[str]) -> str:
    """One markdown row per config and concurrency; each cell holds the servers' figures as "a / b"."""
    metrics = [("output tok/s", "output_throughput", ".1f"), ("req/s", "request_throughput", ".2f"),
               ("median TTFT ms", "median_ttft_ms", ".0f"), ("median TPOT ms", "median_tpot_ms", ".1f"),
               ("p99 ITL ms", "p99_itl_ms", ".1f"), ("failed", "failed", "d")]
    pair = len(names) == 2
    head = ["config", "concurrency", "requests"] + [f"{label} ({' / '.join(names)})" for label, _, _ in metrics]
    head += [f"tok/s ratio ({names[0]} / {names[1]})", "same text"] if pair else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        figures = row["servers"]
        cells = [row["config"], str(row["concurrency"]), str(row["num_prompts"])]
        cells += [" / ".join(format(figures[n][key], fmt) for n in names) for _, key, fmt in metrics]
        if pair:
            a, b = (figures[n]["output_throughput"] for n in names)
            cells += [f"{a / b:.2f}x", f"{row['same_text']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_endpoint(args) -> list[dict]:
    """The plain load generator: an already running server, each concurrency in turn."""
    rows = []
    for concurrency in map(int, args.concurrency.split(",")):
        n = args.num_prompts or max(8, 4 * concurrency)
        prompts = make_prompts(n, args.input_len, args.vocab_size, seed=args.seed + concurrency)
        results, duration = asyncio.run(run_load(args.base_url, args.model, prompts, args.output_len, concurrency,
                                                 args.request_rate, args.api_key, args.seed))
        summary = summarize(results, duration)
        print(f"c={concurrency}: {brief(summary)}", flush=True)
        rows.append({"config": args.model, "concurrency": concurrency, "num_prompts": n,
                     "servers": {"server": summary}})
    return rows


def llamakit_revision() -> str:
    """The commit the servers ran, marked "+dirty" when llamakit/ has uncommitted changes (results depend on them)."""
    repo = Path(__file__).parents[1]
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "llamakit"], capture_output=True, text=True).stdout.strip()
    return (commit or "unknown") + ("+dirty" if dirty else "")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="15m,110m", help="model shapes to build: 15m, 110m (stories15M/110M)")
    p.add_argument("--servers", default="llamakit,llama.cpp", help=f"which of {', '.join(SERVERS)}")
    p.add_argument("--concurrency", default="1,8,32", help="requests in flight; also the servers' batch slots")
    p.add_argument("--num-prompts", type=int, help="requests per level (default: 4 x concurrency, at least 8)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second "
                   "(default inf: all at once, --concurrency at a time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=str(Path(__file__).parents[2] / "shared/assets/llama2/tokenizer.model"))
    p.add_argument("--workdir", default="/tmp/llamakit-serve-bench", help="checkpoints, GGUF files, server logs")
    p.add_argument("--output", help="write every figure as JSON")
    p.add_argument("--llamakit-args", default="", help="extra `llamakit serve` options, e.g. '--prefill-chunk 512'")
    p.add_argument("--llama-server-args", default="", help="extra llama-server options, e.g. '--ubatch-size 256'")
    p.add_argument("--base-url", help="benchmark this running server only (e.g. http://127.0.0.1:8000)")
    p.add_argument("--model", help="with --base-url: the served model name")
    p.add_argument("--vocab-size", type=int, default=32000, help="with --base-url: prompt ids stay below this")
    p.add_argument("--api-key", help="with --base-url: sent as 'Authorization: Bearer KEY'")
    args = p.parse_args()
    if args.base_url and not args.model:
        p.error("--base-url needs --model")
    args.server_args = {"llamakit": args.llamakit_args, "llama.cpp": args.llama_server_args}
    return args


def main() -> None:
    args = parse_args()
    try:
        rows = one_endpoint(args) if args.base_url else compare_servers(args)
    except (llama_cpp.BuildError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    names = ["server"] if args.base_url else args.servers.split(",")
    setup = {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": metadata.version("torch"),
             "llamakit": llamakit_revision(), "llama.cpp": None if args.base_url else llama_cpp.describe()}
    print(f"\n{setup}, input {args.input_len} tokens, output {args.output_len} tokens, "
          f"request rate {args.request_rate}/s\n")
    print(table(rows, names))
    if args.output:
        Path(args.output).write_text(json.dumps({"setup": setup, "args": vars(args), "runs": rows}, indent=2,
                                                default=str))


if __name__ == "__main__":
    main()
