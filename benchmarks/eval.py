"""HellaSwag scoring speed: llamakit next to lm-evaluation-harness's `hf` backend (HFLM) on the same model and tokens.

    python benchmarks/eval.py [--configs 260k,15m] [--examples 200,40] [--batch-size 16] [--repeats 3]
                              [--assets ../shared/assets] [--output results.json]

Both score the same (context, continuation) token ids, made by llamakit's tokenizer from the first
--examples tasks of the HellaSwag validation set (the 6-lines-per-task text form in the assets), 4
candidates per task: llamakit with `score_pairs` (what `llamakit eval` runs), lm_eval with
`HFLM._loglikelihood_tokens` (what `lm_eval --model hf` runs after tokenizing) on a transformers
LlamaForCausalLM loaded from a Hugging Face folder that llamakit wrote from the same weights. Their log-
likelihoods must agree to 1e-3 before timing. "260k" is the real stories260K; "15m" is the stories15M
shape (dim 288, 6 layers, 32000-token vocabulary) with random weights and the Llama 2 tokenizer. The
figure is examples (tasks) per second, the median of --repeats runs after a warm-up; the llamakit
"with tokenization" row adds encoding the text, which lm_eval does before the timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

# benchmarks/ is sys.path[0] when this runs as a script
from decode import median_seconds

from llamakit import ModelConfig, Transformer, load_checkpoint, load_tokenizer, save_model
from llamakit.eval import score_examples, score_pairs
from llamakit.eval.multiple_choice import encode_choices
from llamakit.eval.tasks import load_hellaswag

ASSETS = Path(os.environ.get("LLAMAKIT_SHARED_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def build(name: str, assets: Path, folder: Path):
    """(our model, tokenizer, HF folder with the same weights) for a config name."""
    if name == "260k":
        tiny = assets / "tinyllamas"
        model, tokenizer = load_checkpoint(tiny / "stories260K.bin", tiny / "tok512.model")
    else:
        torch.manual_seed(0)
        config = ModelConfig.from_preset("stories15m").replace(max_seq_len=512)
        model, tokenizer = Transformer(config).eval().requires_grad_(False), load_tokenizer(assets / "llama2" / "tokenizer.model")
    save_model(model, folder, "hf", tokenizer=tokenizer.path)
    return model, tokenizer, folder


def run_config(name: str, n_examples: int, args) -> dict:
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        ours, tokenizer, folder = build(name, args.assets, Path(tmp) / "hf")
        theirs = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size)
    examples = load_hellaswag(args.assets / "eval" / "hellaswag" / "hellaswag_val_full.txt.bz2")[:n_examples]
    pairs = encode_choices(tokenizer, examples)
    window = ours.config.max_seq_len
    requests = [((tokenizer.decode(c), tokenizer.decode(x)), c, x) for c, x in pairs]

    mine = [s.logprob for s in score_pairs(ours, pairs, window, args.batch_size)]
    reference = [lp for lp, _ in theirs._loglikelihood_tokens(requests, disable_tqdm=True)]
    error = max(abs(a - b) for a, b in zip(mine, reference))
    assert error < 1e-3, f"llamakit and lm_eval disagree by {error}"

    seconds = {
        "lm_eval hf": median_seconds(lambda: theirs._loglikelihood_tokens(requests, disable_tqdm=True), args.repeats),
        "llamakit": median_seconds(lambda: score_pairs(ours, pairs, window, args.batch_size), args.repeats),
        "llamakit with tokenization": median_seconds(
            lambda: score_examples(ours, tokenizer, examples, window, args.batch_size), args.repeats),
    }
    tokens = sum(len(c) + len(x) - 1 for c, x in pairs)
    return {"config": name, "examples": n_examples, "pairs": len(pairs), "tokens": tokens, "max_abs_logprob_diff": error,
            "examples_per_s": {k: n_examples / s for k, s in seconds.items()}}


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<6} {'examples':>8} {'tokens':>7}  {'lm_eval hf':>11} {'llamakit':>9} {'ratio':>6} "
          f"{'llamakit+tok':>12}   max |Δ logprob|")
    for r in rows:
        eps = r["examples_per_s"]
        print(f"{r['config']:<6} {r['examples']:>8} {r['tokens']:>7}  {eps['lm_eval hf']:>11.1f} {eps['llamakit']:>9.1f} "
              f"{eps['llamakit'] / eps['lm_eval hf']:>5.2f}x {eps['llamakit with tokenization']:>12.1f}   "
              f"{r['max_abs_logprob_diff']:.1e}")
    print("(HellaSwag examples/s, 4 candidates each; medians)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="260k,15m")
    p.add_argument("--examples", default="200,40", help="HellaSwag tasks per config (comma-separated, in order)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--assets", type=Path, default=ASSETS)
    p.add_argument("--output")
    args = p.parse_args()
    names, counts = args.configs.split(","), [int(n) for n in args.examples.split(",")]
    rows = [run_config(name, n, args) for name, n in zip(names, counts + counts[-1:] * len(names))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    print_table(rows)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
