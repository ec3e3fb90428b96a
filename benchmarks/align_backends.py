"""The rows `benchmarks/align.py` compares, each in a process of its own: llamakit's `dpo` / `reward` commands and
trl's DPOTrainer / RewardTrainer on the same weights, preference pairs and batches; and PPO's rollout sampler next
to llamakit's `generate` and transformers' `generate` on the same prompts.

Every training row reads the same run config (configs/dpo/tiny-dpo.yaml or configs/reward/tiny-reward.yaml with the
benchmark's overrides), encodes the pairs with llamakit (its chat format and truncation) and takes them in the order
llamakit's loop draws them; trl gets those token ids, in that order, one optimizer step per batch of --batch pairs.
Each row returns the wall-clock instant every optimizer step ended, VmHWM at that instant, and the tokens each step
held, so that the parent computes every figure the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"dpo": ROOT / "configs/dpo/tiny-dpo.yaml", "reward": ROOT / "configs/reward/tiny-reward.yaml"}
DATA = "preference/hh-rlhf_harmless-base_test.jsonl.gz"
# LoRA as configs/dpo/tiny-dpo.yaml sets it, for both methods and both tools
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Setup:
    """One training row's inputs: which run, on which weights, for how many steps."""

    task: str  # dpo | reward
    method: str  # full | lora
    weights: Path  # a Hugging Face folder (config.json, model.safetensors, tokenizer.model)
    tokenizer: Path  # the SentencePiece file both tools encode with
    data: Path
    batch: int  # pairs per optimizer step
    seq_len: int
    steps: int  # optimizer steps: warmup + timed + 1 (the last one also runs llamakit's final evaluation)
    activation_checkpointing: bool
    out_dir: Path

    @property
    def pairs(self) -> int:
        return self.steps * self.batch


def memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def run_config(s: Setup):
    """The llamakit run config of this row; trl's settings are read from it too."""
    from llamakit.train import parse_config
    from llamakit.train.dpo import DPORunConfig
    from llamakit.train.reward import RewardRunConfig

    lora = ["--method.lora.rank", str(LORA_RANK), "--method.lora.alpha", str(LORA_ALPHA),
            "--method.lora.dropout", str(LORA_DROPOUT), "--method.lora.targets", f"[{', '.join(LORA_TARGETS)}]"]
    overrides = [
        "--model.path", str(s.weights), "--model.tokenizer", str(s.tokenizer), "--model.dtype", "fp32",
        "--method.name", s.method, *(lora if s.method == "lora" else []),
        "--data.path", str(s.data), "--data.seq_len", str(s.seq_len),
        "--data.max_examples", str(s.pairs + 1), "--data.val_fraction", "0",  # the last pair is the validation set
        "--train.max_steps", str(s.steps), "--train.batch_size", str(s.batch), "--train.micro_batch_size",
        str(s.batch), "--train.device", "cpu", "--train.precision", "fp32",
        "--train.activation_checkpointing", str(s.activation_checkpointing).lower(),
        "--eval.every", "0", "--eval.batches", "1", "--checkpoint.every", "0", "--checkpoint.out_dir", str(s.out_dir),
        "--log.tensorboard", "false", "--log.plot", "false", "--log.peak_tflops", "1"]  # no peak measurement
    kind = DPORunConfig if s.task == "dpo" else RewardRunConfig
    return parse_config(PRESETS[s.task], overrides, kind)


def pairs_in_step_order(cfg, s: Setup) -> list:
    """The encoded training pairs in the order llamakit's loop draws them (one epoch: each pair once)."""
    from llamakit import load_tokenizer
    from llamakit.data.preference import load_preferences
    from llamakit.train.batches import EpochOrder

    train, _, _ = load_preferences(cfg.data, load_tokenizer(s.tokenizer), cfg.data.chat_format)
    if train.num_samples != s.pairs:
        raise SystemExit(f"{s.data} holds {train.num_samples} usable pairs; {s.pairs} needed")
    order = EpochOrder(train.num_samples, cfg.train.seed)
    return [train.pairs[order(k)] for k in range(s.pairs)]


def step_tokens(pairs: list, s: Setup) -> tuple[list[int], list[int]]:
    """Per step: the tokens of its pairs (prompt + answer of the chosen and the rejected sequence, no padding), and
    the size of llamakit's padded input_ids (what its loop counts), to check the step order against its metrics."""
    tokens, padded = [], []
    for k in range(s.steps):
        step = pairs[k * s.batch:(k + 1) * s.batch]
        lengths = [len(p.prompt) + len(p.chosen) for p in step] + [len(p.prompt) + len(p.rejected) for p in step]
        tokens.append(sum(lengths))
        # DPO inputs drop each sequence's last token (it is only a target); a reward model reads it
        padded.append(len(lengths) * (max(lengths) - (s.task == "dpo")))
    return tokens, padded


def finish(s: Setup, ends: list[float], peaks: list[int], tokens: list[int], losses: list[float],
           after_imports: int, reference_seconds: float | None, optimizer: torch.optim.Optimizer) -> dict:
    assert len(ends) == s.steps, f"{len(ends)} step ends recorded, {s.steps} steps run"
    return {"step_ends": ends, "peaks": peaks, "step_tokens": tokens, "first_loss": losses[0] if losses else None,
            "rss_after_imports": after_imports, "reference_seconds": reference_seconds,
            "trainable": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
            "threads": torch.get_num_threads()}


# --- llamakit: the real `llamakit dpo` / `llamakit reward`, timed from outside ------------------------------

def llamakit_row(s: Setup) -> dict:
    """`dpo(cfg)` or `reward(cfg)` as the CLI runs them; three functions are wrapped (not changed) to observe them:
    MetricsLog.record, called once right after every optimizer step, DPO's reference pass, and build_optimizer
    (to count the parameters that train)."""
    import llamakit.train.dpo as dpo_module
    import llamakit.train.runner as runner
    from llamakit.train.metrics import MetricsLog
    from llamakit.train.reward import reward

    after_imports = memory_bytes("VmRSS")
    cfg = run_config(s)
    tokens, padded = step_tokens(pairs_in_step_order(cfg, s), s)
    ends, peaks, losses, seen, reference = [], [], [], [], []
    record = MetricsLog.record

    def timed_record(self, step, values, show=False):
        ends.append(time.perf_counter())
        peaks.append(memory_bytes("VmHWM"))
        losses.append(values["loss"])
        seen.append(values["tokens_seen"])
        record(self, step, values, show)

    reference_logps, build_optimizer, optimizers = dpo_module.reference_logps, runner.build_optimizer, []

    def timed_reference(*args):
        start = time.perf_counter()
        reference_logps(*args)
        reference.append(time.perf_counter() - start)

    def kept_optimizer(*args):
        optimizers.append(build_optimizer(*args))
        return optimizers[-1]

    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(MetricsLog, "record", timed_record))
        patches.enter_context(mock.patch.object(dpo_module, "reference_logps", timed_reference))
        patches.enter_context(mock.patch.object(runner, "build_optimizer", kept_optimizer))
        (dpo_module.dpo if s.task == "dpo" else reward)(cfg)
    counted = [b - a for a, b in zip([0, *seen], seen)]
    assert counted == padded, f"llamakit's steps held other batches than expected: {counted} != {padded}"
    return finish(s, ends, peaks, tokens, losses, after_imports, reference[0] if reference else None, optimizers[0])


# --- trl: DPOTrainer and RewardTrainer on the same token ids ------------------------------------------------

def trl_row(s: Setup, live_reference: bool = False) -> dict:
    """trl's trainer on the same pairs in the same order; `live_reference`: trl's default DPO, the reference
    model run on every batch (a second model, or the LoRA base with the adapter disabled), else its reference
    log-probabilities computed once before training (precompute_ref_log_probs, as llamakit does)."""
    import datasets
    import peft
    import transformers
    import trl

    after_imports = memory_bytes("VmRSS")
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    cfg = run_config(s)
    pairs = pairs_in_step_order(cfg, s)
    tokens, _ = step_tokens(pairs, s)
    tokenizer, common = trl_tokenizer(s), trl_settings(cfg, s)
    lora = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS))
    clock = step_clock()
    if s.task == "dpo":
        args = trl.DPOConfig(**common, beta=cfg.dpo.beta, loss_type=["sigmoid"],
                             precompute_ref_log_probs=not live_reference)
        rows = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
        trainer = given_ids_dpo_trainer(trl)(
            model=str(s.weights), args=args, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[clock],
            peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **lora) if s.method == "lora" else None)
    else:
        args = trl.RewardConfig(**common, center_rewards_coefficient=cfg.reward.center or None)
        rows = [{"chosen_ids": p.prompt + p.chosen, "rejected_ids": p.prompt + p.rejected} for p in pairs]
        trainer = trl.RewardTrainer(
            model=str(s.weights), args=args, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[clock],
            peft_config=peft.LoraConfig(task_type="SEQ_CLS", **lora) if s.method == "lora" else None)
    collated = count_collated(trainer)
    trainer.train()
    assert collated == tokens, f"trl's steps held other tokens than llamakit's: {collated} != {tokens}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return finish(s, clock.ends, clock.peaks, tokens, losses, after_imports, getattr(trainer, "reference_seconds", None),
                  trainer.optimizer)


def trl_settings(cfg, s: Setup) -> dict:
    """DPOConfig / RewardConfig values both trainers share: llamakit's run config, one step per batch."""
    o = cfg.optim
    return dict(
        output_dir=str(s.out_dir), report_to=[], use_cpu=True, bf16=False, seed=cfg.train.seed,
        gradient_checkpointing=s.activation_checkpointing,  # trl's default is True; llamakit's (and here) False
        per_device_train_batch_size=s.batch, gradient_accumulation_steps=1, max_steps=s.steps, max_length=None,
        train_sampling_strategy="sequential",  # the dataset is already in llamakit's order
        learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        weight_decay=o.weight_decay, max_grad_norm=o.grad_clip, warmup_steps=o.warmup_steps, lr_scheduler_type="cosine",
        save_strategy="no", logging_first_step=True, disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"})


def trl_tokenizer(s: Setup):
    """transformers' Llama tokenizer from the same SentencePiece file, padding with llamakit's pad id. trl needs one
    (for its pad id); it encodes nothing here."""
    from transformers import LlamaTokenizer

    from llamakit import load_tokenizer

    tokenizer = LlamaTokenizer.from_pretrained(s.weights)  # the folder holds a copy of the tokenizer.model
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(load_tokenizer(s.tokenizer).pad_id)
    return tokenizer


def given_ids_dpo_trainer(trl):
    """trl's DPOTrainer, given token ids: its text preparation (chat template, tokenizing) is skipped, everything
    else is its own; its reference pass is timed. (RewardTrainer takes token ids as they are.)"""

    class GivenIdsDPOTrainer(trl.DPOTrainer):
        reference_seconds: float | None = None

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.reference_seconds = (self.reference_seconds or 0.0) + time.perf_counter() - start
            return out

    return GivenIdsDPOTrainer


def count_collated(trainer) -> list[int]:
    """The non-padding tokens of every training batch trl collates, in order (the attention mask's sum)."""
    counts, collate = [], trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    return counts


def step_clock():
    """A trainer callback (a factory: transformers is imported in trl's rows only)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """The instant each optimizer step ends (after the optimizer step and zero_grad), and VmHWM then."""

        def __init__(self):
            self.ends, self.peaks = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.peaks.append(memory_bytes("VmHWM"))

    return Clock()



# --- rollout generation: PPO's sampler, llamakit generate, transformers generate ----------------------------

def rollout_row(weights: Path, tokenizer_path: Path, data: Path, prompts: int, prompt_len: int, new_tokens: int,
                repeats: int) -> dict:
    """Seconds to sample `new_tokens` tokens (never stopping early) for each of `prompts` HH-RLHF prompts, with
    each tool, at temperature 1 with no top-k/top-p filter."""
    from llamakit import load_tokenizer
    from llamakit.data.preference import encode_prompt, read_prompts

    tokenizer = load_tokenizer(tokenizer_path)
    ids = [encode_prompt(tokenizer, p, "llama2", prompt_len)[0] for p in read_prompts(data)[0][:prompts]]
    seconds = take_turns(rollout_tools(weights, tokenizer, ids, new_tokens), repeats, len(ids) * new_tokens)
    return {"prompts": len(ids), "prompt_tokens": [len(p) for p in ids], "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_s": {n: len(ids) * new_tokens / statistics.median(t)
                                                 for n, t in seconds.items()},
            "threads": torch.get_num_threads()}


def rollout_tools(weights: Path, tokenizer, ids: list[list[int]], new_tokens: int) -> dict[str, Callable[[], int]]:
    """Each tool as a function that samples the batch once and returns how many tokens it generated."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from llamakit import SamplingParams, generate, load_model
    from llamakit.generate.decode import prepare_for_decoding
    from llamakit.model import KVCache
    from llamakit.train.rollout import sample_responses

    policy, prepared = load_model(weights), prepare_for_decoding(load_model(weights))
    params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=i) for i in range(len(ids))]
    longest = max(len(p) for p in ids) + new_tokens
    cache, prepared_cache = KVCache.for_model(policy, len(ids), longest), KVCache.for_model(prepared, len(ids), longest)
    hf = LlamaForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_id, eos_token_id=None)
    width = max(len(p) for p in ids)
    left_padded = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in ids])  # (B, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])  # (B, width)

    @torch.no_grad()
    def transformers_generate() -> int:
        return hf.generate(input_ids=left_padded, attention_mask=mask, generation_config=sampling)[:, width:].numel()

    def llamakit_generate(model, kv) -> int:
        return sum(len(c.tokens) for c in generate(model, tokenizer, ids, new_tokens, params, stop_ids=frozenset(),
                                                   cache=kv))

    return {"rollout": lambda: sum(map(len, sample_responses(policy, cache, ids, params, new_tokens, frozenset())[0])),
            "generate": lambda: llamakit_generate(policy, cache),
            "generate-prepared": lambda: llamakit_generate(prepared, prepared_cache),
            "transformers": transformers_generate}


def take_turns(tools: dict[str, Callable[[], int]], repeats: int, expected: int) -> dict[str, list[float]]:
    """One untimed round, then `repeats` timed ones; in each the tools take turns, in an order rotated every round
    (so that none always runs right after the same other one)."""
    names, seconds = list(tools), {name: [] for name in tools}
    for round_ in range(repeats + 1):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            made = tools[name]()
            if round_:
                seconds[name].append(time.perf_counter() - start)
            assert made == expected, f"{name} generated {made} tokens, not {expected}"
    return seconds
