"""Decode and prefill speed: llamakit next to transformers `generate` and llama.cpp, and against the memory-bandwidth
bound; with --quality, greedy text and perplexity of each weight type next to llama.cpp's.

    python benchmarks/decode.py [--configs 15m,110m,1b] [--dtypes fp32,bf16] [--batches 1,8] [--compile]
                                [--quantize int8,int4] [--group-size 32] [--threads 2]
                                [--llama-cpp | --no-llama-cpp] [--assets ../shared/assets]
                                [--quality] [--ppl-chars 100000] [--ppl-ctx 512]
                                [--new-tokens 128] [--repeats 3] [--output results.json]
                                [--profile] [--speculation [--spec-tokens 200]]

Both libraries run the same random weights in the same process (llamakit after `prepare_for_decoding`,
which its entry points apply: fp32 CPU products through the kernels generate/cpu_linear.py picks on this
machine, named in the header; transformers as it loads), greedy,
for exactly --new-tokens tokens after a 16-token prompt; the figure is the median over --repeats runs
after a warm-up. Decoding one token reads every weight once (the embedding table excepted: one row),
so tokens/s can be at most bandwidth / weight bytes per step; the bandwidth is measured here, as the
best of a large sum() and a large matrix-vector product. Prefill is timed separately on a 512-token prompt.

--compile adds llamakit rows decoding with the torch.compile'd step (generate/compiled.py), after one run that
compiles it (compile_s in the JSON); `same tokens` there compares with eager llamakit. --configs 260k: stories260K.

--quantize adds llamakit rows with int8/int4 weights (model/quantize.py; the embedding and norms stay fp32).
transformers has no CPU int8/int4 path here, so those rows repeat its fp32 figure for comparison, and their
greedy tokens, from other weights, are not compared.

llama.cpp (on by default when benchmarks/llama_cpp.py has built it; --no-llama-cpp skips it) runs the same
weights, written as GGUF by llamakit's own writer (with the Llama 2 tokenizer from --assets, which llama.cpp
needs): fp32 -> f32, bf16 -> bf16, and int8 -> Q8_0, int4 -> Q4_0, which the writer quantizes from the fp32 model.
`llama-bench` times its batch-1 decode (--new-tokens from an empty context) and 512-token prefill at --threads
threads, just before llamakit's rows of the same type, so the two alternate within one run; `vs llama.cpp` is
llamakit's tokens/s over llama.cpp's. Details in decode_llama_cpp.py. Everything runs on --threads threads
(torch.set_num_threads); --configs '' with --quality runs the quality section alone.

--profile splits each type's batch-1 decode step into the weight products (every linear layer and the head,
timed by hooks) and the rest, and lists torch's heaviest operators of a step (torch.profiler).

--speculation runs speculative decoding on the real stories260K against plain greedy decoding of it: a draft made
from its first layer and distilled on text it samples (~15 s), eager and on the compiled step, and prompt lookup,
on a story prompt and one that quotes itself, batch 1 and 4: tokens/s, speed-up, acceptance rate, target forwards
per token, and whether the tokens equal plain decoding's.

--quality uses the real stories260K and tok512 from --assets: the greedy text of llama2.c's run.c test (200 tokens
from BOS) from llamakit fp32 and each --quantize type and from llama.cpp f32/Q8_0/Q4_0, as characters equal to
llamakit fp32's; and perplexity on the first --ppl-chars characters (whole lines) of tinyshakespeare, computed as
`llama-perplexity` does (--ppl-ctx-token chunks, the second half of each scored) next to `llama-perplexity -f`
on the matching GGUF. tok512 squeezes runs of spaces, which GGUF cannot record; the section says whether the two
tokenizations of the slice agree.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import decode_llama_cpp  # benchmarks/ is sys.path[0] when this runs as a script
import llama_cpp
import torch

from llamakit.checkpoint import load_checkpoint
from llamakit.checkpoint.hf import config_to_hf
from llamakit.generate import SamplingParams, Speculation, cpu_linear, generate, prefill
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.decode import prepare_for_decoding
from llamakit.generate.engine import decode_one
from llamakit.model import KVCache, ModelConfig, Transformer, resolve_dtype
from llamakit.model.llama import TiedHead
from llamakit.model.quantize import Int4Linear, Int8Linear, quantize

CONFIGS = {  # ~260K, ~15M and ~110M: the tinyllamas shapes; ~1B: TinyLlama-1.1B's shape (GQA, 32k vocabulary)
    "260k": ModelConfig.from_preset("stories260k"),
    "15m": ModelConfig.from_preset("stories15m").replace(max_seq_len=1024),
    "110m": ModelConfig.from_preset("stories110m").replace(max_seq_len=1024),
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                      max_seq_len=2048),
}
PROMPT_LEN, PREFILL_LEN = 16, 512
ASSETS = Path(os.environ.get("LLAMAKIT_SHARED_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
GREEDY = SamplingParams(temperature=0)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, caches, one-off dispatch work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory: the best of a 1 GiB sum and a 1 GiB matrix-vector product."""
    x = torch.randn(2**28)  # 1 GiB of fp32, far beyond any cache
    w, v = x.view(2**14, 2**14), torch.randn(2**14)
    return x.nbytes / min(median_seconds(x.sum, repeats), median_seconds(lambda: torch.mv(w, v), repeats))


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: all of them (quantized layers' integers and scales included),
    except the embedding table, of which one row, unless it is also the output head."""
    tensors = [*model.parameters(), *(b for name, b in model.named_buffers() if name != "inv_freq")]
    total = sum(t.numel() * t.element_size() for t in tensors)
    embedding = model.embed_tokens.weight
    return total if isinstance(model.lm_head, TiedHead) else total - embedding.numel() * embedding.element_size()


def build_pair(config: ModelConfig, dtype: torch.dtype):
    """Our model with random weights, and a transformers model with the same values."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    ours = Transformer(config).to(dtype).eval().requires_grad_(False)
    hf_config = LlamaConfig(**config_to_hf(config, dtype))
    hf_config.eos_token_id = None  # random weights: never stop early, always generate --new-tokens
    with no_init_weights():
        theirs = LlamaForCausalLM(hf_config).to(dtype)
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, assign=True, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()  # tied configs: point lm_head at the embedding just assigned
    return prepare_for_decoding(ours), theirs.eval().requires_grad_(False)


def random_prompts(config: ModelConfig, batch: int) -> torch.Tensor:
    return torch.randint(3, config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def decode_ours(ours, batch: int, new_tokens: int, repeats: int, compiled: CompiledDecode | None = None) -> float:
    prompts = random_prompts(ours.config, batch).tolist()
    return median_seconds(lambda: generate(ours, None, prompts, new_tokens, GREEDY, stop_ids=frozenset(),
                                           compiled=compiled), repeats)


def compiled_rows(name: str, label: str, ours: Transformer, args, bandwidth: float, results: dict) -> None:
    """llamakit with the torch.compile'd decode step (--compile): the first run compiles (its seconds are recorded
    as compile_s); `same tokens` compares its greedy tokens with eager llamakit's."""
    compiled, step_bytes, label = CompiledDecode(ours), weight_bytes_per_token(ours), f"{label} compiled"
    for batch in map(int, args.batches.split(",")):
        prompts = random_prompts(ours.config, batch).tolist()
        start = time.perf_counter()
        first = generate(ours, None, prompts, args.new_tokens, GREEDY, stop_ids=frozenset(), compiled=compiled)
        compile_s = time.perf_counter() - start
        eager = generate(ours, None, prompts, args.new_tokens, GREEDY, stop_ids=frozenset())
        same = [c.tokens for c in first] == [c.tokens for c in eager]
        seconds = decode_ours(ours, batch, args.new_tokens, args.repeats, compiled)
        decode_row(name, label, batch, seconds, None, args.new_tokens, step_bytes, bandwidth, same, None)
        record(results, name, label, batch, {}, weight_bytes_per_step=step_bytes, llamakit_s=seconds,
               compile_s=compile_s, same_tokens_as_eager=same)


def decode_pair(ours, theirs, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = random_prompts(ours.config, batch)

    def run_ours():
        return generate(ours, None, prompts.tolist(), new_tokens, GREEDY, stop_ids=frozenset())

    def run_theirs():
        with torch.inference_mode():
            return theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)

    same = [c.tokens for c in run_ours()] == run_theirs()[:, PROMPT_LEN:].tolist()
    return {"llamakit_s": median_seconds(run_ours, repeats), "transformers_s": median_seconds(run_theirs, repeats),
            "same_tokens": same}


def prefill_tokens(config: ModelConfig) -> torch.Tensor:
    return torch.randint(3, config.vocab_size, (1, PREFILL_LEN), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def prefill_ours(ours, repeats: int) -> float:
    tokens = prefill_tokens(ours.config)[0].tolist()
    return median_seconds(lambda: prefill(ours, KVCache.for_model(ours, 1, PREFILL_LEN + 1), 0, tokens), repeats)


def prefill_pair(ours, theirs, repeats: int) -> dict:
    tokens = prefill_tokens(ours.config)

    @torch.inference_mode()
    def run_ours():
        return prefill(ours, KVCache.for_model(ours, 1, PREFILL_LEN + 1), 0, tokens[0].tolist())

    @torch.inference_mode()
    def run_theirs():
        return theirs(tokens, use_cache=True, logits_to_keep=1)

    return {"llamakit_s": median_seconds(run_ours, repeats), "transformers_s": median_seconds(run_theirs, repeats)}


def cpp_cells(cpp: dict | None, key: str, ours_tps: float, fmt: str) -> str:
    """The llama.cpp type, its tokens/s and llamakit's over it (dashes where llama.cpp did not run)."""
    if not cpp:
        return "- | - | -"
    theirs_tps = cpp[f"llama_cpp_{key}_tokens_per_s"]
    return f"{cpp['llama_cpp_type']} | {theirs_tps:{fmt}} | {ours_tps / theirs_tps:.2f}x"


def decode_row(name: str, label: str, batch: int, ours_s: float, theirs_s: float | None, new_tokens: int,
               step_bytes: int, bandwidth: float, same, cpp: dict | None) -> None:
    tokens = batch * new_tokens
    ours_tps = tokens / ours_s
    theirs = f"{tokens / theirs_s:.1f} | {theirs_s / ours_s:.2f}x" if theirs_s else "- | -"
    cpp = cpp_cells(cpp if batch == 1 else None, "decode", ours_tps, ".1f")  # llama-bench decodes batch 1
    bound = 100 * (ours_tps / batch) * step_bytes / bandwidth  # steps/s x bytes/step vs bandwidth
    print(f"| {name} | {label} | {batch} | {ours_tps:.1f} | {theirs} | {cpp} | {bound:.0f}% | {same} |", flush=True)


def prefill_row(name: str, label: str, ours_s: float, theirs_s: float | None, cpp: dict | None) -> None:
    theirs = f"{PREFILL_LEN / theirs_s:.0f} | {theirs_s / ours_s:.2f}x" if theirs_s else "- | -"
    cpp = cpp_cells(cpp, "prefill", PREFILL_LEN / ours_s, ".0f")
    print(f"| {name} | {label} | prefill {PREFILL_LEN} | {PREFILL_LEN / ours_s:.0f} | {theirs} | {cpp} | | |",
          flush=True)


def llama_cpp_figures(runner: decode_llama_cpp.LlamaCpp | None, model: Transformer, kind: str, args) -> dict:
    """llama.cpp on `model`'s weights as the GGUF type matching `kind` ({} without llama.cpp or a match)."""
    if runner is None or kind not in decode_llama_cpp.GGUF_TYPES:
        return {}
    try:
        tokenizer = args.assets / ("tinyllamas/tok512.model" if model.config.vocab_size == 512 else "llama2/tokenizer.model")
        return runner.bench(model, kind, tokenizer, PREFILL_LEN, args.new_tokens)
    except RuntimeError as e:  # one failed run leaves dashes, not a lost table
        print(f"(llama.cpp, {kind}: {e})", flush=True)
        return {}


def record(results: dict, name: str, label: str, batch: int | None, cpp: dict, **figures) -> None:
    """One JSON entry: decode at `batch`, or prefill (batch None); llama.cpp's figure of the same kind beside it."""
    if batch is None:
        entry = {"config": name, "dtype": label, "tokens": PREFILL_LEN, **figures}
        cpp = {k: v for k, v in cpp.items() if "decode" not in k}
    else:
        entry = {"config": name, "dtype": label, "batch": batch, **figures}
        cpp = {k: v for k, v in cpp.items() if "prefill" not in k} if batch == 1 else {}
    results["prefill" if batch is None else "decode"].append(entry | cpp)


def pair_rows(name: str, dtype_name: str, args, bandwidth: float, results: dict,
              runner: decode_llama_cpp.LlamaCpp | None) -> tuple[Transformer, dict]:
    """llama.cpp, then llamakit and transformers at each batch size and on prefill; returns our model and
    transformers' seconds."""
    ours, theirs = build_pair(CONFIGS[name], resolve_dtype(dtype_name))
    cpp = llama_cpp_figures(runner, ours, dtype_name, args)
    step_bytes, theirs_s = weight_bytes_per_token(ours), {}
    for batch in map(int, args.batches.split(",")):
        r = decode_pair(ours, theirs, batch, args.new_tokens, args.repeats)
        decode_row(name, dtype_name, batch, r["llamakit_s"], r["transformers_s"], args.new_tokens, step_bytes,
                   bandwidth, r["same_tokens"], cpp)
        record(results, name, dtype_name, batch, cpp, weight_bytes_per_step=step_bytes, **r)
        theirs_s[batch] = r["transformers_s"]
    if args.compile:
        compiled_rows(name, dtype_name, ours, args, bandwidth, results)
    if args.profile:
        profile_line(name, dtype_name, ours, results)
    r = prefill_pair(ours, theirs, args.repeats)
    record(results, name, dtype_name, None, cpp, **r)
    prefill_row(name, dtype_name, r["llamakit_s"], r["transformers_s"], cpp)
    theirs_s["prefill"] = r["transformers_s"]
    return ours, theirs_s


def quantized_rows(name: str, kind: str, ours: Transformer, theirs_s: dict, args, bandwidth: float,
                   results: dict, runner: decode_llama_cpp.LlamaCpp | None) -> None:
    """llama.cpp with the matching GGUF type, then llamakit with `kind` weights, both made from the fp32 `ours`,
    next to transformers' fp32 seconds (when measured)."""
    cpp = llama_cpp_figures(runner, ours, kind, args)
    group_size = args.group_size if kind == "int4" else None
    model = prepare_for_decoding(quantize(copy.deepcopy(ours), kind, group_size))
    label = f"{kind} (groups of {group_size})" if group_size else kind
    step_bytes = weight_bytes_per_token(model)
    for batch in map(int, args.batches.split(",")):
        seconds = decode_ours(model, batch, args.new_tokens, args.repeats)
        decode_row(name, label, batch, seconds, theirs_s.get(batch), args.new_tokens, step_bytes, bandwidth, "-", cpp)
        record(results, name, label, batch, cpp, weight_bytes_per_step=step_bytes, llamakit_s=seconds,
               transformers_fp32_s=theirs_s.get(batch))
    if args.profile:
        profile_line(name, label, model, results)
    seconds = prefill_ours(model, args.repeats)
    record(results, name, label, None, cpp, llamakit_s=seconds, transformers_fp32_s=theirs_s.get("prefill"))
    prefill_row(name, label, seconds, theirs_s.get("prefill"), cpp)


WEIGHT_PRODUCTS = (torch.nn.Linear, TiedHead, Int8Linear, Int4Linear)


@torch.inference_mode()
def profile_step(model: Transformer, steps: int = 32) -> dict:
    """Where a batch-1 decode step's time goes: the weight products (every linear layer and the head, timed by
    hooks, which add ~2 us each) and everything else (attention, norms, RoPE, the cache, argmax, Python)."""
    spent, started = [0.0], [0.0]

    def before(module, args):
        started[0] = time.perf_counter()

    def after(module, args, output):
        spent[0] += time.perf_counter() - started[0]

    handles = [h for m in model.modules() if isinstance(m, WEIGHT_PRODUCTS)
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        cache = KVCache.for_model(model, 1, PROMPT_LEN + 2 * steps + 1)
        token = prefill(model, cache, 0, random_prompts(model.config, 1)[0].tolist()).argmax()[None]
        for _ in range(steps // 2):  # warm-up
            token = decode_one(model, cache, [0], token).argmax(-1)
        spent[0], start = 0.0, time.perf_counter()
        for _ in range(steps):
            token = decode_one(model, cache, [0], token).argmax(-1)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    with torch.profiler.profile() as prof:  # what the rest is made of: torch's operators by self time
        for _ in range(steps // 4):
            token = decode_one(model, cache, [0], token).argmax(-1)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    step_bytes = weight_bytes_per_token(model)
    return {"step_ms": 1e3 * total / steps, "products_ms": 1e3 * spent[0] / steps,
            "products_gb_per_s": step_bytes * steps / spent[0] / 1e9,
            "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 / (steps // 4) for e in ops},
            "top_ops_calls": {e.key: e.count / (steps // 4) for e in ops}}


def profile_line(name: str, label: str, model: Transformer, results: dict) -> None:
    p = profile_step(model)
    results.setdefault("profile", []).append({"config": name, "dtype": label, **p})
    print(f"  profile {name} {label}, batch 1: {p['step_ms']:.2f} ms a step = {p['products_ms']:.2f} ms in weight "
          f"products ({p['products_gb_per_s']:.1f} GB/s) + {p['step_ms'] - p['products_ms']:.2f} ms elsewhere; "
          "top operators a step (profiled, OpenBLAS calls not seen): "
          + ", ".join(f"{k} {ms:.3f} ms/{p['top_ops_calls'][k]:.0f} calls" for k, ms in p["top_ops_ms"].items()),
          flush=True)


def distilled_draft(target: Transformer, steps: int = 300, n_layers: int = 1) -> Transformer:
    """A draft for `target`: its embedding, first n_layers blocks, final norm and head (early exit), then trained
    to match the target's next-token distributions (KL) on 256 x 128 tokens the target samples itself
    (sequence-level distillation); about 15 s for stories260K."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    sampled = []
    for _ in range(4):
        out = generate(target, None, [[1]] * 64, 127, SamplingParams(temperature=1.0, top_p=1.0),
                       stop_ids=frozenset(), generator=generator)
        sampled += [[1] + c.tokens for c in out]
    data = torch.tensor(sampled)  # (256, 128)
    draft = Transformer(target.config.replace(n_layers=n_layers))
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers})
    optimizer = torch.optim.AdamW(draft.train().parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        batch = data[torch.randint(0, data.size(0), (16,))]  # (16, 128)
        with torch.no_grad():
            teacher = torch.log_softmax(target(batch), -1)
        student = torch.log_softmax(draft(batch), -1)
        loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") / batch.size(1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prepare_for_decoding(draft.eval().requires_grad_(False))


SPECULATION_PROMPTS = {  # (prompt, batch): a story opening, and a prompt that quotes itself (prompt lookup's case)
    "story": "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "quote": ("Tom had a red ball. Tom said, \"I like my red ball.\" Mom said, \"Tom, you like your red ball.\" "
              "Tom said, \"I like my red ball"),
}


def speculation_table(args, results: dict) -> None:
    """Speculative decoding (a 1-layer draft distilled from stories260K, eager and on the compiled step) and
    prompt-lookup decoding against plain decoding of the real stories260K, greedy: tokens/s, speed-up,
    acceptance, target forwards per token, same tokens."""
    tiny = args.assets / "tinyllamas"
    target, tokenizer = load_checkpoint(tiny / "stories260K.bin", tiny / "tok512.model", torch.float32, "cpu")
    target = prepare_for_decoding(target.eval().requires_grad_(False))
    start = time.perf_counter()
    draft = distilled_draft(target)
    print(f"\ndraft: stories260K's first of 5 layers, distilled for 300 steps on its own samples "
          f"({time.perf_counter() - start:.0f} s)")
    print("| prompt | batch | drafter | gamma | tok/s | vs plain | accepted | target forwards / token | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    new = args.spec_tokens
    for label, text in SPECULATION_PROMPTS.items():
        for batch in (1, 4):
            prompts = [tokenizer.encode(text, bos=True)] * batch
            run_plain = functools.partial(generate, target, None, prompts, new, GREEDY, stop_ids=frozenset())
            plain, plain_s = run_plain(), median_seconds(run_plain, args.repeats)
            print(f"| {label} | {batch} | none | - | {batch * new / plain_s:.0f} | 1.00x | - | 1.00 | - |", flush=True)
            for drafter, model, gamma, compile in (("1-layer draft", draft, 2, False), ("1-layer draft", draft, 4, False),
                                                   ("1-layer draft, compiled", draft, 4, True),
                                                   ("prompt lookup", None, 4, False)):
                spec = Speculation(target, model, gamma, compile=compile)
                run = functools.partial(spec.generate, None, prompts, new, GREEDY, stop_ids=frozenset())
                ours = run()
                s, same = spec.stats, [c.tokens for c in ours] == [c.tokens for c in plain]
                rate, forwards = s.acceptance_rate, s.target_forwards / new  # one call's stats, before timing
                seconds = median_seconds(run, args.repeats)
                print(f"| {label} | {batch} | {drafter} | {gamma} | {batch * new / seconds:.0f} | "
                      f"{plain_s / seconds:.2f}x | {rate:.0%} | {forwards:.2f} | {same} |", flush=True)
                results.setdefault("speculation", []).append(
                    {"prompt": label, "batch": batch, "drafter": drafter, "gamma": gamma, "plain_s": plain_s,
                     "seconds": seconds, "acceptance_rate": rate, "target_forwards_per_token": forwards,
                     "same_tokens": same})


def find_llama_cpp(args) -> tuple[dict, str]:
    """llama.cpp's built binaries (none if skipped or absent) and a line saying which."""
    bins = llama_cpp.built()
    needed = ["llama-bench"] if args.configs else []
    needed += ["llama-server", "llama-perplexity"] if args.quality else []
    missing = [b for b in needed if b not in bins]
    if args.llama_cpp is False:
        return {}, "llama.cpp: skipped (--no-llama-cpp)"
    if missing and args.llama_cpp:
        raise SystemExit(f"error: llama.cpp's {', '.join(missing)} not built; run `python benchmarks/llama_cpp.py` "
                         "once, or pass --no-llama-cpp")
    if not (args.assets / "llama2" / "tokenizer.model").is_file() and args.configs:
        return {}, f"llama.cpp: skipped, no Llama 2 tokenizer in {args.assets} (--assets) for its GGUF files"
    note = f"; {', '.join(missing)} not built: `python benchmarks/llama_cpp.py` builds them" if missing else ""
    found = [b for b in needed if b in bins]
    return bins, f"llama.cpp: {', '.join(found) or 'none'} from {llama_cpp.cache_dir() / 'bin'}{note}"


def speed_table(args, bandwidth: float, runner: decode_llama_cpp.LlamaCpp | None, results: dict) -> None:
    print("| config | dtype (llamakit) | batch | llamakit tok/s | transformers tok/s (int8/int4 rows: its fp32) "
          "| vs transformers | llama.cpp type | llama.cpp tok/s | vs llama.cpp | % of bandwidth bound | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    kinds = [k for k in args.quantize.split(",") if k]
    for name in args.configs.split(","):
        dtypes = args.dtypes.split(",")
        for dtype_name in dtypes + (["fp32"] if kinds and "fp32" not in dtypes else []):
            if dtype_name in dtypes:
                ours, theirs_s = pair_rows(name, dtype_name, args, bandwidth, results, runner)
            else:  # quantized rows only: made from an fp32 model, with no transformers figure beside them
                torch.manual_seed(0)
                ours, theirs_s = prepare_for_decoding(Transformer(CONFIGS[name]).eval().requires_grad_(False)), {}
            if dtype_name == "fp32":
                for kind in kinds:
                    quantized_rows(name, kind, ours, theirs_s, args, bandwidth, results, runner)
            del ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="15m,110m,1b", help="speed rows for these configs ('' for none)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--quantize", default="int8,int4", help="quantized llamakit rows, made from the fp32 model "
                   "('' for none)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp alike")
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                   help="run llama.cpp beside llamakit (default: when benchmarks/llama_cpp.py has built it)")
    p.add_argument("--assets", type=Path, default=ASSETS, help="the shared assets folder")
    p.add_argument("--quality", action="store_true", help="greedy text and perplexity of stories260K per type")
    p.add_argument("--ppl-chars", type=int, default=100_000, help="characters of tinyshakespeare for perplexity")
    p.add_argument("--ppl-ctx", type=int, default=512, help="perplexity chunk length, tokens")
    p.add_argument("--output", help="write all figures as JSON")
    p.add_argument("--compile", action="store_true", help="add llamakit rows decoding with the torch.compile'd step")
    p.add_argument("--profile", action="store_true", help="split each type's batch-1 step: weight products vs the rest")
    p.add_argument("--speculation", action="store_true", help="speculative and prompt-lookup decoding on stories260K")
    p.add_argument("--spec-tokens", type=int, default=200, help="tokens per row in the speculation section")
    args = p.parse_args()

    stories = args.assets / "tinyllamas" / "stories260K.bin"
    if (args.quality or args.speculation) and not stories.is_file():
        raise SystemExit(f"error: --quality and --speculation need {stories} (and tok512.model, "
                         "corpus/tinyshakespeare_input.txt beside it); point --assets at the shared assets folder")
    torch.set_num_threads(args.threads)
    bins, note = find_llama_cpp(args)
    results = {"threads": args.threads, "llama_cpp": note, "decode": [], "prefill": []}
    print(note)
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        if args.configs:
            bandwidth = measure_bandwidth()
            results["bandwidth_bytes_per_s"] = bandwidth
            kernels = "OpenBLAS (1 row) and oneDNN" if cpu_linear.use_rowwise() else "MKL, weights column-major"
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured read bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s; llamakit's fp32 CPU products: {kernels}\n")
            results["cpu_linear"] = kernels
            runner = (decode_llama_cpp.LlamaCpp(bins, args.threads, args.repeats, Path(tmp))
                      if "llama-bench" in bins else None)
            speed_table(args, bandwidth, runner, results)
        if args.speculation:
            speculation_table(args, results)
        if args.quality:
            kinds = [k for k in args.quantize.split(",") if k]
            results["quality"] = decode_llama_cpp.quality(args.assets, bins, kinds, args.group_size, args.ppl_chars,
                                                          args.ppl_ctx, args.threads, Path(tmp))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
