"""llama.cpp beside llamakit for benchmarks/decode.py, on the same weights written as GGUF by llamakit's own writer.

Speed: `llama-bench` times batch-1 decode (-n new tokens from an empty context) and a 512-token prefill (-p 512),
at the thread count llamakit uses, with llama.cpp's defaults otherwise (f16 KV cache, repacked Q4_0). Figures are
the median of its per-repeat tokens/s, after its warm-up run, as llamakit's are medians. llamakit's decode time
also includes its 16-token prompt (about one step's worth in 128), a slight handicap for llamakit.

Quality (--quality), on the real stories260K: the greedy text of run.c's test in llama2.c (200 tokens from BOS
alone), from llamakit fp32/int8/int4 and from llama.cpp f32/q8_0/q4_0 (`llama-server`, temperature 0), each scored
by how many characters it shares with llamakit's fp32 text; and the perplexity of a tinyshakespeare slice, computed
in llamakit the way `llama-perplexity` computes it (whole chunks of --ppl-ctx tokens, BOS in place of each chunk's
first token, only the second half of each chunk scored), next to `llama-perplexity -f` on the matching GGUF. Both
llama.cpp tools use an f32 KV cache here, so only the weights differ from llamakit. Both texts are decoded with
the same tokenizer, so only the tokens can differ.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import llama_cpp  # benchmarks/ is sys.path[0] when decode.py runs as a script
import torch
import torch.nn.functional as F

from llamakit import load_model, save_model
from llamakit.generate import SamplingParams, generate
from llamakit.generate.decode import prepare_for_decoding
from llamakit.model import Transformer
from llamakit.model.quantize import quantize
from llamakit.tokenizer import load_tokenizer

GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # llamakit weights -> GGUF type
RUNC_STEPS = 200  # llama2.c's test_all.py: `run stories260K.bin -z tok512.bin -t 0.0 -n 200`, no prompt
F32_CACHE = ["-ctk", "f32", "-ctv", "f32"]  # llama.cpp's default f16 KV cache would round what llamakit keeps fp32


@dataclass
class LlamaCpp:
    """llama.cpp's binaries and the settings every run shares."""

    bins: dict[str, Path]
    threads: int
    repeats: int
    workdir: Path

    def bench(self, model: Transformer, kind: str, tokenizer: Path, prefill_len: int, new_tokens: int) -> dict:
        """llama-bench's decode and prefill tokens/s on `model` written as GGUF type GGUF_TYPES[kind]."""
        gguf_type = GGUF_TYPES[kind]
        path = self.workdir / f"bench-{gguf_type}.gguf"
        save_model(model, path, "gguf", tokenizer=tokenizer, gguf_type=gguf_type, overwrite=True)
        try:
            out = run([self.bins["llama-bench"], "-m", path, "-p", prefill_len, "-n", new_tokens, "-t", self.threads,
                       "-r", self.repeats, "-o", "json"], "llama-bench")
        finally:
            path.unlink()
        tests = json.loads(out)
        ts = {("prefill" if t["n_prompt"] else "decode"): statistics.median(t["samples_ts"]) for t in tests}
        return {"llama_cpp_type": gguf_type, "llama_cpp_decode_tokens_per_s": ts["decode"],
                "llama_cpp_prefill_tokens_per_s": ts["prefill"], "llama_cpp_build": tests[0]["build_commit"],
                "llama_cpp_gguf_bytes": tests[0]["model_size"]}


def run(cmd: list, what: str) -> str:
    """stdout of a llama.cpp tool; on failure, an error naming the tool and its last output line."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()] or [f"exit {done.returncode}"]
        raise RuntimeError(f"{what} failed: {lines[-1].strip()}")
    return done.stdout + done.stderr


# ---- quality: stories260K ----

def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def chunked_perplexity(model: Transformer, ids: list[int], n_ctx: int, bos_id: int, batch: int = 8) -> float:
    """llama-perplexity's figure in llamakit: whole chunks of n_ctx tokens, each with BOS in place of its first
    token; the logits at positions n_ctx/2 .. n_ctx-2 are scored against the next token."""
    n_chunks, first = len(ids) // n_ctx, n_ctx // 2
    chunks = torch.tensor(ids[:n_chunks * n_ctx]).view(n_chunks, n_ctx)  # (C, T)
    targets = chunks[:, first + 1:].clone()  # (C, T/2 - 1): the original tokens, BOS replaces inputs only
    chunks[:, 0] = bos_id
    nll = 0.0
    for x, y in zip(chunks.split(batch), targets.split(batch)):
        logits = model(x)[:, first:-1].float()  # (B, T/2 - 1, V)
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return math.exp(nll / targets.numel())


def llama_perplexity(binary: Path, gguf: Path, text_file: Path, n_ctx: int, threads: int) -> float:
    out = run([binary, "-m", gguf, "-f", text_file, "-c", n_ctx, "-b", n_ctx, "-t", threads, *F32_CACHE],
              "llama-perplexity")
    found = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    if found is None:  # e.g. a text shorter than the two chunks it needs
        raise RuntimeError(f"llama-perplexity gave no estimate (raise --ppl-chars or lower --ppl-ctx): {out[-300:]}")
    return float(found.group(1))


def llamakit_quality(source: Path, tok, kind: str, group_size: int, ids: list[int], n_ctx: int) -> dict:
    model = load_model(source)
    if kind != "fp32":
        model = quantize(model, kind, group_size if kind == "int4" else None)
    model = prepare_for_decoding(model.eval().requires_grad_(False))
    [done] = generate(model, tok, [[tok.bos_id]], RUNC_STEPS, SamplingParams(temperature=0))
    return {"text": tok.decode(done.tokens), "ppl": chunked_perplexity(model, ids, n_ctx, tok.bos_id), "model": model}


def llama_cpp_quality(bins: dict[str, Path], gguf: Path, tok, text_file: Path, n_ctx: int, threads: int) -> dict:
    out = {}
    if "llama-server" in bins:
        with llama_cpp.llama_server(bins["llama-server"], gguf, threads, n_ctx) as url:
            done = llama_cpp.post(url, "/completion", {"prompt": [tok.bos_id], "n_predict": RUNC_STEPS, "temperature": 0.0,
                                             "return_tokens": True, "cache_prompt": False})
            out["text"] = tok.decode(done["tokens"])
            out["ids"] = llama_cpp.post(url, "/tokenize", {"content": text_file.read_text(), "add_special": True})["tokens"]
    if "llama-perplexity" in bins:
        out["ppl"] = llama_perplexity(bins["llama-perplexity"], gguf, text_file, n_ctx, threads)
    return out


def quality(assets: Path, bins: dict[str, Path], kinds: list[str], group_size: int, ppl_chars: int, n_ctx: int,
            threads: int, workdir: Path) -> dict:
    """Greedy text and perplexity of stories260K per weight type, llamakit's next to llama.cpp's; prints a table."""
    source, tok_path = assets / "tinyllamas" / "stories260K.bin", assets / "tinyllamas" / "tok512.model"
    tok = load_tokenizer(tok_path)
    text = (assets / "corpus" / "tinyshakespeare_input.txt").read_text()
    text = text[:text.rfind("\n", 0, ppl_chars) + 1]  # whole lines: a cut word's trailing space tokenizes apart
    text_file = workdir / "tinyshakespeare_slice.txt"
    text_file.write_text(text)
    ids = tok.encode(text, bos=True)
    logging.getLogger("llamakit.checkpoint.gguf_vocab").setLevel(logging.ERROR)  # the caveat is printed below
    rows, fp32_model = {}, None
    for kind in ["fp32", *kinds]:
        ours = llamakit_quality(source, tok, kind, group_size, ids, n_ctx)
        model = ours.pop("model")
        fp32_model = model if kind == "fp32" else fp32_model  # every GGUF is written from the fp32 weights
        theirs = {}
        if {"llama-server", "llama-perplexity"} & bins.keys():
            gguf = save_model(fp32_model, workdir / f"stories260K-{GGUF_TYPES[kind]}.gguf", "gguf", tokenizer=tok_path,
                              gguf_type=GGUF_TYPES[kind], overwrite=True)
            theirs = llama_cpp_quality(bins, gguf, tok, text_file, n_ctx, threads)
        rows[kind] = {"llamakit": ours, "llama_cpp": theirs}
    return report(rows, tok, ids, fp32_model, n_ctx, len(text))


def report(rows: dict, tok, ids: list[int], fp32_model: Transformer, n_ctx: int, n_chars: int) -> dict:
    reference = rows["fp32"]["llamakit"]["text"]
    print(f"\nstories260K, greedy from BOS for {RUNC_STEPS} tokens (run.c's test): characters equal to llamakit fp32's "
          f"{len(reference)}; perplexity of the first {n_chars} characters of tinyshakespeare, llama-perplexity's "
          f"scheme with {n_ctx}-token chunks\n")
    print("| llamakit | llama.cpp | llamakit chars = fp32 | llama.cpp chars = fp32 | llamakit ppl | llama.cpp ppl |")
    print("|---|---|---|---|---|---|")
    results = {"reference_text": reference, "ppl_chars": n_chars, "ppl_ctx": n_ctx, "types": []}
    for kind, r in rows.items():
        ours, theirs = r["llamakit"], r["llama_cpp"]
        row = {"llamakit_type": kind, "llama_cpp_type": GGUF_TYPES[kind],
               "llamakit_chars_equal": common_prefix(ours["text"], reference), "llamakit_ppl": ours["ppl"],
               "llama_cpp_chars_equal": common_prefix(theirs["text"], reference) if "text" in theirs else None,
               "llama_cpp_ppl": theirs.get("ppl"), "llamakit_text": ours["text"], "llama_cpp_text": theirs.get("text")}
        results["types"].append(row)
        cells = [row["llamakit_chars_equal"], row["llama_cpp_chars_equal"], f"{ours['ppl']:.4f}",
                 f"{theirs['ppl']:.4f}" if "ppl" in theirs else None]
        print(f"| {kind} | {GGUF_TYPES[kind]} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    theirs_ids = rows["fp32"]["llama_cpp"].get("ids")
    if theirs_ids is not None:
        results["same_tokenization"] = theirs_ids == ids
        print(f"\nTokenization caveat: tok512.model squeezes runs of spaces, which GGUF cannot record, so llama.cpp "
              f"keeps them. On this slice llama.cpp makes {len(theirs_ids)} tokens, llamakit {len(ids)}: "
              f"{'identical' if theirs_ids == ids else 'different'}.")
        if theirs_ids != ids:  # the same numbers on llama.cpp's tokens: what is left is numerics, not tokenization
            ppl = chunked_perplexity(fp32_model, theirs_ids, n_ctx, tok.bos_id)
            results["llamakit_fp32_ppl_on_llama_cpp_tokens"] = ppl
            print(f"llamakit fp32 on llama.cpp's tokens: perplexity {ppl:.4f}")
    return results
