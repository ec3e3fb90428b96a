"""Decode and prefill speed: llamakit next to transformers `generate`, and against the memory-bandwidth bound.

    python benchmarks/decode.py [--configs 15m,110m,1b] [--dtypes fp32,bf16] [--batches 1,8]
                                [--quantize int8,int4] [--group-size 32]
                                [--new-tokens 128] [--repeats 3] [--output results.json]

Both libraries run the same random weights in the same process (llamakit after `prepare_for_decoding`,
which its entry points apply: fp32 CPU matrices stored column-major; transformers as it loads), greedy,
for exactly --new-tokens tokens after a 16-token prompt; the figure is the median over --repeats runs
after a warm-up. Decoding one token reads every weight once (the embedding table excepted: one row),
so tokens/s can be at most bandwidth / weight bytes per step; the bandwidth is measured here, as the
best of a large sum() and a large matrix-vector product. Prefill is timed separately on a 512-token prompt.

--quantize adds llamakit rows with int8/int4 weights (model/quantize.py; the embedding and norms stay fp32).
transformers has no CPU int8/int4 path here, so those rows repeat its fp32 figure for comparison, and their
greedy tokens, from other weights, are not compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from llamakit.checkpoint.hf import config_to_hf
from llamakit.generate import SamplingParams, generate, prefill
from llamakit.generate.decode import prepare_for_decoding
from llamakit.model import KVCache, ModelConfig, Transformer, resolve_dtype
from llamakit.model.llama import TiedHead
from llamakit.model.quantize import quantize

CONFIGS = {  # ~15M and ~110M: the tinyllamas shapes; ~1B: TinyLlama-1.1B's shape (GQA, 32k vocabulary)
    "15m": ModelConfig.from_preset("stories15m").replace(max_seq_len=1024),
    "110m": ModelConfig.from_preset("stories110m").replace(max_seq_len=1024),
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                      max_seq_len=2048),
}
PROMPT_LEN, PREFILL_LEN = 16, 512
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


def decode_ours(ours, batch: int, new_tokens: int, repeats: int) -> float:
    prompts = random_prompts(ours.config, batch).tolist()
    return median_seconds(lambda: generate(ours, None, prompts, new_tokens, GREEDY, stop_ids=frozenset()), repeats)


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


def decode_row(name: str, label: str, batch: int, ours_s: float, theirs_s: float | None, new_tokens: int,
               step_bytes: int, bandwidth: float, same) -> None:
    tokens = batch * new_tokens
    ours_tps = tokens / ours_s
    theirs = f"{tokens / theirs_s:.1f} | {theirs_s / ours_s:.2f}x" if theirs_s else "- | -"
    bound = 100 * (ours_tps / batch) * step_bytes / bandwidth  # steps/s x bytes/step vs bandwidth
    print(f"| {name} | {label} | {batch} | {ours_tps:.1f} | {theirs} | {bound:.0f}% | {same} |", flush=True)


def prefill_row(name: str, label: str, ours_s: float, theirs_s: float | None) -> None:
    theirs = f"{PREFILL_LEN / theirs_s:.0f} | {theirs_s / ours_s:.2f}x" if theirs_s else "- | -"
    print(f"| {name} | {label} | prefill {PREFILL_LEN} | {PREFILL_LEN / ours_s:.0f} | {theirs} | | |", flush=True)


def pair_rows(name: str, dtype_name: str, args, bandwidth: float, results: dict) -> tuple[Transformer, dict]:
    """Both libraries at each batch size and on prefill; returns our model and transformers' seconds."""
    ours, theirs = build_pair(CONFIGS[name], resolve_dtype(dtype_name))
    step_bytes, theirs_s = weight_bytes_per_token(ours), {}
    for batch in map(int, args.batches.split(",")):
        r = decode_pair(ours, theirs, batch, args.new_tokens, args.repeats)
        decode_row(name, dtype_name, batch, r["llamakit_s"], r["transformers_s"], args.new_tokens, step_bytes,
                   bandwidth, r["same_tokens"])
        results["decode"].append({"config": name, "dtype": dtype_name, "batch": batch,
                                  "weight_bytes_per_step": step_bytes, **r})
        theirs_s[batch] = r["transformers_s"]
    r = prefill_pair(ours, theirs, args.repeats)
    results["prefill"].append({"config": name, "dtype": dtype_name, "tokens": PREFILL_LEN, **r})
    prefill_row(name, dtype_name, r["llamakit_s"], r["transformers_s"])
    theirs_s["prefill"] = r["transformers_s"]
    return ours, theirs_s


def quantized_rows(name: str, kind: str, ours: Transformer, theirs_s: dict, args, bandwidth: float,
                   results: dict) -> None:
    """llamakit alone with `kind` weights, next to transformers' fp32 seconds (when measured)."""
    group_size = args.group_size if kind == "int4" else None
    model = prepare_for_decoding(quantize(copy.deepcopy(ours), kind, group_size))
    label = f"{kind} (groups of {group_size})" if group_size else kind
    step_bytes = weight_bytes_per_token(model)
    for batch in map(int, args.batches.split(",")):
        seconds = decode_ours(model, batch, args.new_tokens, args.repeats)
        decode_row(name, label, batch, seconds, theirs_s.get(batch), args.new_tokens, step_bytes, bandwidth, "-")
        results["decode"].append({"config": name, "dtype": label, "batch": batch, "weight_bytes_per_step": step_bytes,
                                  "llamakit_s": seconds, "transformers_fp32_s": theirs_s.get(batch)})
    seconds = prefill_ours(model, args.repeats)
    results["prefill"].append({"config": name, "dtype": label, "tokens": PREFILL_LEN, "llamakit_s": seconds,
                               "transformers_fp32_s": theirs_s.get("prefill")})
    prefill_row(name, label, seconds, theirs_s.get("prefill"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="15m,110m,1b")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--quantize", default="int8,int4", help="quantized llamakit rows, made from the fp32 model "
                   "('' for none)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", help="write all figures as JSON")
    args = p.parse_args()

    bandwidth = measure_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| config | dtype (llamakit) | batch | llamakit tok/s | transformers tok/s (int8/int4 rows: its fp32) "
          "| ratio | % of bandwidth bound | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    results = {"bandwidth_bytes_per_s": bandwidth, "decode": [], "prefill": []}
    kinds = [k for k in args.quantize.split(",") if k]
    for name in args.configs.split(","):
        dtypes = args.dtypes.split(",")
        for dtype_name in dtypes + (["fp32"] if kinds and "fp32" not in dtypes else []):
            if dtype_name in dtypes:
                ours, theirs_s = pair_rows(name, dtype_name, args, bandwidth, results)
            else:  # quantized rows only: made from an fp32 model, with no transformers figure beside them
                torch.manual_seed(0)
                ours, theirs_s = prepare_for_decoding(Transformer(CONFIGS[name]).eval().requires_grad_(False)), {}
            if dtype_name == "fp32":
                for kind in kinds:
                    quantized_rows(name, kind, ours, theirs_s, args, bandwidth, results)
            del ours
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
