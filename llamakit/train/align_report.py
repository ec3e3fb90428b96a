"""The alignment pipeline's data split and its before/after report (align_demo.sh).

`split`: preference pairs into disjoint parts by prompt (a hash of its first user turn, so a prompt asked twice
lands in one part): pairs for the reward model that trains the policies, pairs for an independent judge reward model,
held-out pairs, and the train part's chosen dialogs as chat SFT rows.
`report`: one answer per held-out prompt from the SFT model and each aligned policy (the same seeds for all), scored
by the judge and the train reward model, with the KL to the SFT model, Σ_t [log π(a_t) − log π_sft(a_t)] over the
sampled tokens (the k1 estimate PPO logs), and each reward model's pairwise accuracy on the held-out pairs.
    python -m llamakit.train.align_report split PAIRS --out DIR
    python -m llamakit.train.align_report report --sft SFT --policy PPO=ADAPTER ... --prompts HELD_OUT \\
        --judge RM_JUDGE --train-rm RM_TRAIN --output report.json
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import json
import logging
import sys
from pathlib import Path

import torch

from llamakit.checkpoint import load_checkpoint
from llamakit.data.preference import PreferencePair, encode_prompt, read_pairs, read_prompts
from llamakit.errors import LlamakitError
from llamakit.files import atomic_file
from llamakit.generate.chat import chat_style
from llamakit.generate.sampling import SamplingParams
from llamakit.model import KVCache, Transformer
from llamakit.tokenizer.chat import stop_ids_for
from llamakit.train.rejection import sample_params
from llamakit.train.rewards import RewardModel
from llamakit.train.rl import token_logprobs
from llamakit.train.rollout import response_batch, sample_responses

log = logging.getLogger(__name__)
SPLITS = {"rm_train": 0.44, "rm_judge": 0.44, "heldout": 0.12}  # fractions of the prompts


def split_pairs(pairs: list[PreferencePair], fractions: dict[str, float] = SPLITS) -> dict[str, list[PreferencePair]]:
    """The pairs in disjoint parts, in file order; a part is picked by a hash of the prompt's first user turn."""
    names, edges = list(fractions), list(itertools.accumulate(fractions.values()))
    parts: dict[str, list[PreferencePair]] = {name: [] for name in names}
    for pair in pairs:
        first = next(m["content"] for m in pair.prompt if m["role"] == "user")
        u = int.from_bytes(hashlib.sha256(first.encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)
        parts[names[min(bisect.bisect_right(edges, u), len(names) - 1)]].append(pair)
    return parts


def write_splits(path: str, out: str | Path) -> dict[str, int]:
    """Write each part's pairs (DIR/NAME.jsonl) and the train part's chosen dialogs as chat SFT rows (DIR/sft.jsonl)."""
    pairs, report = read_pairs(path)  # skips (and counts) unusable rows, e.g. dialogs whose turns do not alternate
    parts = split_pairs(pairs)
    rows = {name: [{"messages": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in part]
            for name, part in parts.items()}
    rows["sft"] = [{"messages": [*p.prompt, {"role": "assistant", "content": p.chosen}]} for p in parts["rm_train"]]
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, part in rows.items():
        with atomic_file(Path(out) / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
    return {name: len(part) for name, part in rows.items()} | {"skipped": sum(report.skipped.values())}


def load_policy(sft: str, path: str, device: str = "cpu") -> tuple[Transformer, object]:
    """A policy and its tokenizer: a model folder, or an adapter folder (adapter_config.json) on the SFT model."""
    if (Path(path) / "adapter_config.json").is_file():
        return load_checkpoint(sft, dtype="fp32", device=device, adapter=path)
    return load_checkpoint(path, dtype="fp32", device=device)


def sample_answers(policy: Transformer, tokenizer, prompts: list, max_new_tokens: int, temperature: float, seed: int,
                   batch_size: int) -> dict:
    """One answer per prompt, row i sampling from its own seeded stream (the same for every policy): the prompt ids,
    the response ids (stop id included) and whether each ended before max_new_tokens."""
    style = chat_style(policy, tokenizer)
    limit = policy.config.max_seq_len - max_new_tokens
    encoded = [encode_prompt(tokenizer, p, style, limit)[0] for p in prompts]
    params = sample_params(SamplingParams(temperature=temperature, top_p=1.0, seed=seed), len(encoded))
    stop_ids = stop_ids_for(tokenizer, style)
    cache = KVCache.for_model(policy, batch_size, policy.config.max_seq_len)
    responses, ended = [], []
    for b0 in range(0, len(encoded), batch_size):
        r, e = sample_responses(policy, cache, encoded[b0:b0 + batch_size], params[b0:b0 + batch_size],
                                max_new_tokens, stop_ids)
        responses, ended = responses + r, ended + e
    texts = [tokenizer.decode(r[:-1] if e else r) for r, e in zip(responses, ended)]
    return {"prompts": encoded, "responses": responses, "ended": ended, "texts": texts}


@torch.no_grad()
def sequence_kl(policy: Transformer, reference: Transformer, prompts: list[list[int]], responses: list[list[int]],
                pad_id: int, temperature: float = 1.0, batch_size: int = 32) -> torch.Tensor:
    """Each answer's Σ_t [log π(a_t) − log π_ref(a_t)] over its response tokens (N,)."""
    out = torch.zeros(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))  # little padding
    device = policy.embed_tokens.weight.device
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        batch = response_batch([prompts[i] + responses[i] for i in rows], [len(prompts[i]) for i in rows], pad_id)
        tokens, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (B, T)
        lp, _ = token_logprobs(policy(tokens), labels, temperature)  # (B, T), 0 off the response
        ref, _ = token_logprobs(reference(tokens), labels, temperature)
        out[rows] = (lp - ref).sum(-1).float().cpu()  # (B,)
    return out


def pairwise_accuracy(rm: RewardModel, pairs: list[PreferencePair]) -> float:
    """The fraction of pairs whose chosen answer the reward model scores strictly higher than the rejected one."""
    dialogs = [p.prompt for p in pairs]
    chosen, rejected = rm.score(dialogs, [p.chosen for p in pairs]), rm.score(dialogs, [p.rejected for p in pairs])
    return (chosen > rejected).float().mean().item()


def paired_difference(scores: torch.Tensor, baseline: torch.Tensor) -> list[float]:
    """The mean of scores − baseline over the same prompts, and its standard error."""
    d = scores - baseline
    return [d.mean().item(), (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0]


def policy_row(answers: dict, kl: torch.Tensor, judged: torch.Tensor, trained: torch.Tensor,
               sft: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """A policy's means over the held-out answers (judge and train-RM rewards, each with its paired difference to
    the SFT model's answers; KL to SFT, tokens, the fraction that ended) and its first answer."""
    return {"judge_reward": judged.mean().item(), "judge_vs_sft": paired_difference(judged, sft[0]),
            "train_rm_reward": trained.mean().item(), "train_rm_vs_sft": paired_difference(trained, sft[1]),
            "kl_to_sft": kl.mean().item(), "length": sum(map(len, answers["responses"])) / len(answers["responses"]),
            "ended": sum(answers["ended"]) / len(answers["ended"]), "example": answers["texts"][0]}


def markdown(rows: dict[str, dict], accuracy: dict[str, float], pairs: int) -> str:
    """The before/after table (Δ: the paired difference to SFT ± its standard error) and the held-out accuracies."""
    delta = lambda d: f"{d[0]:+.4f} ± {d[1]:.4f}" if d[1] else "—"  # noqa: E731
    lines = ["| policy | judge reward | Δ judge | train-RM reward | Δ train-RM | KL to SFT | answer tokens | ended |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['judge_reward']:+.4f} | {delta(r['judge_vs_sft'])} | {r['train_rm_reward']:+.4f} | "
              f"{delta(r['train_rm_vs_sft'])} | {r['kl_to_sft']:.3f} | {r['length']:.1f} | {r['ended']:.2f} |"
              for name, r in rows.items()]
    held = ", ".join(f"{name} {acc:.3f}" for name, acc in accuracy.items())
    return "\n".join(lines) + f"\n\nheld-out pairwise accuracy ({pairs} pairs): {held}"


def report(args: argparse.Namespace) -> dict:
    """Sample, score and compare every policy; the numbers behind the table."""
    judge, train_rm = RewardModel.load(args.judge, args.device), RewardModel.load(args.train_rm, args.device)
    pairs = read_pairs(args.pairs or args.prompts)[0][:args.max_pairs]
    log.info("scoring %d held-out pairs with each reward model", len(pairs))
    accuracy = {"judge": pairwise_accuracy(judge, pairs), "train_rm": pairwise_accuracy(train_rm, pairs)}
    prompts = read_prompts(args.prompts)[0][:args.max_prompts]
    dialogs = [p.messages for p in prompts]
    sft, tokenizer = load_policy(args.sft, args.sft, args.device)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    rows, baseline = {}, None
    for name, path in [("SFT", args.sft), *(spec.split("=", 1) for spec in args.policy)]:
        policy = sft if path == args.sft else load_policy(args.sft, path, args.device)[0]
        log.info("%s: sampling and scoring %d answers", name, len(prompts))
        answers = sample_answers(policy, tokenizer, prompts, args.max_new_tokens, args.temperature, args.seed,
                                 args.batch_size)
        kl = (torch.zeros(len(prompts)) if policy is sft else
              sequence_kl(policy, sft, answers["prompts"], answers["responses"], pad_id, args.temperature))
        scored = judge.score(dialogs, answers["texts"]), train_rm.score(dialogs, answers["texts"])
        baseline = baseline or scored  # the first row's: the SFT model's
        rows[name] = policy_row(answers, kl, *scored, baseline) | {"path": path}
    return {"policies": rows, "accuracy": accuracy, "pairs": len(pairs), "prompts": len(prompts),
            "settings": {k: v for k, v in vars(args).items() if k != "command"}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llamakit.train.align_report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="preference pairs -> disjoint train / judge / held-out parts and SFT rows")
    s.add_argument("pairs", help="a preference file (any form data/preference.py reads)")
    s.add_argument("--out", required=True, help="the folder to write rm_train, rm_judge, heldout and sft .jsonl to")
    r = sub.add_parser("report", help="the before/after table")
    r.add_argument("--sft", required=True, help="the SFT model folder (the KL reference, and the base of adapters)")
    r.add_argument("--policy", action="append", default=[], metavar="NAME=PATH",
                   help="an aligned policy: a model folder or an adapter on the SFT model (repeatable)")
    r.add_argument("--prompts", required=True, help="held-out prompts (a preference file gives the pairs too)")
    r.add_argument("--pairs", help="held-out pairs for the accuracies (default: --prompts)")
    r.add_argument("--judge", required=True, help="a reward model trained on none of the policies' data")
    r.add_argument("--train-rm", required=True, help="the reward model the policies were trained against")
    for flag, kind, default in (("--max-prompts", int, 128), ("--max-pairs", int, None), ("--max-new-tokens", int, 64),
                                ("--temperature", float, 1.0), ("--seed", int, 0), ("--batch-size", int, 64)):
        r.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    r.add_argument("--device", default="cpu")
    r.add_argument("--output", help="write the numbers (and a sample answer per policy) as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)  # this report's progress; the library's own INFO lines stay quiet
    try:
        if args.command == "split":
            counts = write_splits(args.pairs, args.out)
            print(", ".join(f"{name}: {n} rows" for name, n in counts.items()) + f" in {args.out}")
            return
        found = report(args)
    except LlamakitError as e:  # a bad path or file: one line, no traceback, as the CLI
        sys.exit(f"align_report {args.command}: error: {e}")
    print(markdown(found["policies"], found["accuracy"], found["pairs"]))
    if args.output:
        with atomic_file(Path(args.output)) as tmp:
            Path(tmp).write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
