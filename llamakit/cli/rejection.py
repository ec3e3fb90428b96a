"""`llamakit rejection-sample`: Llama 2's rejection sampling, best-of-K answers as fine-tuning data."""

from __future__ import annotations

import argparse
import dataclasses

from llamakit.cli.argtypes import positive_int
from llamakit.cli.inference import add_model_options, add_sampling_options, load_for_generation, max_seq_len


def rejection_sample(args: argparse.Namespace) -> None:
    """Sample K answers per prompt, keep the one the reward model scores best, write them as fine-tuning data."""
    from llamakit.runtime import default_dtype, resolve_device
    from llamakit.train.rejection import RejectionConfig, RejectionRound, check_inputs
    from llamakit.train.rewards import Reward, RewardModel

    cfg = RejectionConfig(prompts=args.prompts, output=args.output, samples=args.samples, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts,
                          chat_format=args.chat_format, pool=args.pool, overwrite=args.force)
    check_inputs(cfg)  # before any model is loaded
    device = resolve_device(args.device, "--device")
    dtype = args.dtype or default_dtype(device)
    helpful = RewardModel.load(args.reward_model, device, dtype, args.batch_size)
    safe = (RewardModel.load(args.safety_reward_model, device, dtype, args.batch_size) if args.safety_reward_model
            else None)
    rejection = RejectionRound(cfg, Reward(helpful, safe, args.safety_threshold))  # reads prompts and pool
    policy, tokenizer, params, generator = load_for_generation(args)
    cfg.max_seq_len = max_seq_len(args, policy)
    summary = rejection.run(policy, tokenizer, dataclasses.replace(params, seed=args.seed), generator)
    print(_report(summary))


def _report(s: dict) -> str:
    pooled = f"; {s['kept_from_pool']} of {s['pool_matches']} pooled answers kept" if s["pool_matches"] else ""
    truncated = f" ({s['truncated_prompts']} prompts cut to fit the window)" if s["truncated_prompts"] else ""
    return (f"kept the best of {s['samples_per_prompt']} samples for {s['prompts']} prompts{truncated}: "
            f"{s['output']}\n"
            f"mean best score {s['mean_best_score']:.4f} (best sampled {s['mean_sampled_best_score']:.4f}, "
            f"all samples {s['mean_score']:.4f}){pooled}\n"
            f"generated {s['generated_tokens']} tokens in {s['generation_seconds']:.2f} s "
            f"({s['tokens_per_second']:.1f} tokens/s, prefill included)\n"
            f"try: llamakit finetune configs/finetune/tiny-sft.yaml --data.format chat --data.path {s['output']}")


def add_rejection_sample(p: argparse.ArgumentParser) -> None:
    add_model_options(p)  # --checkpoint etc.: the policy
    add_sampling_options(p, max_new_tokens=256)
    p.add_argument("--prompts", required=True, help="prompts: a .json/.jsonl/.parquet file of prompt, messages or "
                   "preference rows (an optional boolean \"safety\" marks safety prompts)")
    p.add_argument("--reward-model", required=True, help="reward model folder (llamakit reward's final/); with "
                   "--safety-reward-model, the helpfulness one")
    p.add_argument("--safety-reward-model", help="a safety reward model: Llama 2's rule then scores safety prompts, "
                   "and answers it finds unsafe, by it (the others by --reward-model)")
    p.add_argument("--safety-threshold", type=float, default=0.15, help="below this sigmoid(safety score) an answer "
                   "counts as unsafe (default 0.15, Llama 2's)")
    p.add_argument("--samples", type=positive_int, default=4, help="answers drawn per prompt, K (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences decoded (and scored) together; a prompt's K samples count K (default 16)")
    p.add_argument("--max-prompts", type=positive_int, help="only the first N usable prompts")
    p.add_argument("--chat-format", choices=["llama2", "llama3", "alpaca"],
                   help="the policy's prompt format (default: the one it or --adapter was tuned with, else the "
                        "tokenizer's)")
    p.add_argument("--pool", nargs="+", default=[], metavar="FILE", help="earlier rounds' outputs: a prompt keeps "
                   "their answer when its score beats this round's best (same reward models only)")
    p.add_argument("--output", required=True, help="the JSON Lines file to write (fine-tuning data, chat rows)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (atomically)")
