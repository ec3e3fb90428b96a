"""`llamakit pretrain`: train a model from a YAML config."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def pretrain(args: argparse.Namespace) -> None:
    """Pretrain a Llama on prepared shards with the LLaMA recipe, from a YAML config; --resume continues exactly."""
    from llamakit.train import parse_config
    from llamakit.train import pretrain as run

    overrides = [a for a in args.overrides if a != "--resume"]
    cfg = parse_config(args.config, overrides)
    logging.getLogger("llamakit").setLevel(logging.INFO)
    final = run(cfg, resume=args.resume or len(overrides) < len(args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(cfg.checkpoint.out_dir)
        print(f"final model: {final}\nmetrics: {out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'}, "
              f"curve: {out / 'loss.png'})\ntry: llamakit generate --checkpoint {final} \"Once upon a time\"")


def add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in checkpoint.out_dir from its latest step")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override any config value, e.g. --optim.lr 1e-3 --train.max_steps 500; "
                        "`llamakit pretrain CONFIG --help` lists every key")
