"""`llamakit pretrain`, `finetune`, `dpo`, `reward`, `ppo`, `merge`: train a model from a YAML config; fold an adapter in."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain a Llama on prepared shards with the LLaMA recipe, from a YAML config; --resume continues exactly."""
    from llamakit.train import PretrainConfig
    from llamakit.train import pretrain as run

    final, out = _train(args, PretrainConfig, run)
    if final is not None:
        print(f"final model: {final}\n{_outputs(out)}\ntry: llamakit generate --checkpoint {final} \"Once upon a time\"")


def finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model on instruction or chat data (full, LoRA, prefix or prompt tuning) from a YAML config."""
    from llamakit.train.finetune import FinetuneConfig
    from llamakit.train.finetune import finetune as run

    final, out = _train(args, FinetuneConfig, run)
    if final is None:
        return
    base = args.cfg.model
    tokenizer = f" --tokenizer {base.tokenizer}" if base.tokenizer else ""
    if (final / "adapter_config.json").is_file():
        print(f"adapter: {final}\n{_outputs(out)}\ntry: llamakit chat --checkpoint {base.path}{tokenizer} --adapter "
              f"{final}\nor fold a LoRA adapter into the base: llamakit merge --base {base.path}{tokenizer} "
              f"--adapter {final} --output {out / 'merged'}")
    else:
        print(f"final model: {final}\n{_outputs(out)}\ntry: llamakit chat --checkpoint {final}")


def dpo(args: argparse.Namespace) -> None:
    """Align a model with preference pairs by DPO (full or LoRA) from a YAML config; --resume continues exactly."""
    from llamakit.train.dpo import DPORunConfig
    from llamakit.train.dpo import dpo as run

    final, out = _train(args, DPORunConfig, run)
    if final is not None:
        kind = "adapter" if (final / "adapter_config.json").is_file() else "final model"
        print(f"{kind}: {final}\n{_outputs(out)}")


def reward(args: argparse.Namespace) -> None:
    """Train a reward model on preference pairs (a scalar head on the model, the pairwise loss) from a YAML config."""
    from llamakit.train.reward import RewardRunConfig
    from llamakit.train.reward import reward as run

    final, out = _train(args, RewardRunConfig, run)
    if final is not None:
        print(f"reward model: {final}\n{_outputs(out)}")


def ppo(args: argparse.Namespace) -> None:
    """RLHF by PPO against a reward model (or a reward function), full or LoRA, from a YAML config; --resume
    continues exactly."""
    from llamakit.train.ppo import PPORunConfig
    from llamakit.train.ppo import ppo as run

    final, out = _train(args, PPORunConfig, run)
    if final is not None:
        kind = "adapter" if (final / "adapter_config.json").is_file() else "final model"
        print(f"{kind}: {final}\n{_outputs(out)}")


def _train(args: argparse.Namespace, kind: type, run):
    """Parse the config and its overrides, train; returns (final folder, run folder) on rank 0, else None."""
    from llamakit.train import parse_config

    overrides = [a for a in args.overrides if a != "--resume"]
    cfg = args.cfg = parse_config(args.config, overrides, kind)
    logging.getLogger("llamakit").setLevel(logging.INFO)
    final = run(cfg, resume=args.resume or len(overrides) < len(args.overrides))
    if int(os.environ.get("RANK", "0")) != 0:
        return None, None
    return final, Path(cfg.checkpoint.out_dir)


def _outputs(out: Path) -> str:
    return f"metrics: {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'}, curve: {out / 'loss.png'})"


def merge(args: argparse.Namespace) -> None:
    """Fold a LoRA adapter into its base model and write a normal model folder (a reward model's adapter, with its
    score head: a whole reward model, in the llamakit or Hugging Face format). A QLoRA adapter folds into the
    dequantized NF4 base it was trained on: the merged model computes what the QLoRA model computed."""
    from llamakit.checkpoint import find_tokenizer, load_model, save_model
    from llamakit.checkpoint.io import check_separate
    from llamakit.checkpoint.peft import base_transforms, load_adapter
    from llamakit.errors import LlamakitError
    from llamakit.model.lora import merge_lora
    from llamakit.model.reward import is_reward_model

    for source in (args.base, args.adapter):
        check_separate(source, args.output)
    model = load_model(args.base, dtype="fp32", transforms=base_transforms(args.adapter))  # QLoRA: NF4 as trained
    method = load_adapter(model, args.adapter)
    if method != "lora":
        raise LlamakitError(f"{args.adapter} is a {method}-tuning adapter: only LoRA updates fold into the weights; "
                            f"use it unmerged with --adapter {args.adapter}")
    tokenizer = args.tokenizer or find_tokenizer(args.base)
    if is_reward_model(model) and args.to == "meta":
        raise LlamakitError(f"{args.adapter} is a reward model's adapter: Meta's format has no score head; merge it "
                            "--to llamakit or --to hf (LlamaForSequenceClassification)")
    save_model(merge_lora(model), args.output, args.to, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.force)
    if is_reward_model(model):
        print(f"wrote the merged reward model to {args.output}; load it with "
              f"llamakit.checkpoint.load_reward_model({str(args.output)!r})")
    else:
        print(f"wrote the merged model to {args.output}; try: llamakit chat --checkpoint {args.output}")


def _add_run_config(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("config", help=f"a YAML config, e.g. {example}")
    p.add_argument("--resume", action="store_true", help="continue the run in checkpoint.out_dir from its latest "
                   "step-N/ (a finished run: nothing to do, unless train.max_steps was raised)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override any config value, e.g. --optim.lr 1e-3 --train.max_steps 500; "
                        "`llamakit COMMAND CONFIG --help` lists every key")


def add_pretrain(p: argparse.ArgumentParser) -> None:
    _add_run_config(p, "configs/pretrain/tiny.yaml")


def add_finetune(p: argparse.ArgumentParser) -> None:
    _add_run_config(p, "configs/finetune/tiny-lora.yaml")


def add_dpo(p: argparse.ArgumentParser) -> None:
    _add_run_config(p, "configs/dpo/tiny-dpo.yaml")


def add_reward(p: argparse.ArgumentParser) -> None:
    _add_run_config(p, "configs/reward/tiny-reward.yaml")


def add_ppo(p: argparse.ArgumentParser) -> None:
    _add_run_config(p, "configs/ppo/tiny-ppo.yaml")


def add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base model the adapter was trained on (any format)")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder (llamakit finetune's or PEFT's)")
    p.add_argument("--output", required=True, help="the merged model folder to write")
    p.add_argument("--to", default="llamakit", choices=["llamakit", "hf", "meta"], help="output format")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="store the merged weights in this dtype")
    p.add_argument("--tokenizer", help="tokenizer file to copy beside the weights (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (atomically)")
