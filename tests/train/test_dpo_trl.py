"""Our DPO loss, metrics and gradients equal trl's DPOTrainer on the same batch of a tiny random model, and where
they differ on purpose (label smoothing, IPO's rewards, the NLL term, truncation) a test says by how much.

trl (checked with 1.16) runs its own data path (tokenize, add EOS, split prompt and completion, collate) and its own
loss (DPOTrainer.compute_loss, then backward) on a transformers Llama with an explicit ref_model; we rebuild the same
pairs from trl's token ids and run DPOObjective on the same weights loaded into llamakit (HF names are ours with a
"model." prefix, and both use the rotate-half RoPE layout: no permutation). The policy is the reference with its
weights nudged, so the log-ratios h, and with them the gradients, are far from zero.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llamakit import load_model
from llamakit.data.preference import EncodedPair, PreferenceExamples, PreferencePair, encode_pair
from llamakit.train.preference import DPOConfig, DPOObjective, sequence_logprobs
from tests.helpers import hf_llama

trl = pytest.importorskip("trl")

TOL = 1e-5  # absolute, or relative for values above 1 (IPO's loss is ~25, where fp32's spacing is 2e-6)
BETA, EPS = 0.1, 0.1
PAD, BOS, EOS, UNK = 0, 1, 2, 3
LENGTHS = [(5, 4, 7), (3, 9, 2), (8, 6, 6)]  # words of (prompt, chosen, rejected): padding in every row but one
# trl's names for the metrics we also report (per pair, averaged over the batch in both)
REWARDS = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
           "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}
# The same objective in both: (trl DPOConfig options, our DPOConfig).
# Conservative DPO (Mitchell 2023), -(1-ε)·log σ(βh) - ε·log σ(-βh), is no single trl 1.16 loss: its "sigmoid"
# ignores label_smoothing, and label_smoothing feeds "robust" (rDPO, Chowdhury et al. 2024), a different loss.
# With S = -log σ(βh), and log σ(x) - log σ(-x) = x: cDPO = S + εβh and robust = S - εβh/(1-2ε), so
# cDPO = (2-2ε)·sigmoid - (1-2ε)·robust, which trl computes when given those two losses and weights.
CASES = {
    "sigmoid": (dict(loss_type=["sigmoid"]), DPOConfig(beta=BETA)),
    "conservative": (dict(loss_type=["sigmoid", "robust"], loss_weights=[2 - 2 * EPS, -(1 - 2 * EPS)],
                          label_smoothing=EPS), DPOConfig(beta=BETA, label_smoothing=EPS)),
    "ipo": (dict(loss_type=["ipo"]), DPOConfig(beta=BETA, loss="ipo")),
}


@dataclass
class Step:
    """One loss evaluation and backward pass: the mean loss over pairs, metrics, and grads under HF names."""

    loss: float
    metrics: dict[str, float]
    grads: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A folder with reference/ and policy/: HF checkpoints of a tiny Llama, the policy's weights nudged."""
    root = tmp_path_factory.mktemp("dpo_trl")
    reference = hf_llama(seed=0)
    reference.save_pretrained(root / "reference")
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    reference.save_pretrained(root / "policy")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory ("w17" is id 17), since trl tokenizes the pairs itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **{f"w{i}": i for i in range(4, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def dataset():
    """trl's standard (non-conversational) preference rows of random words; trl appends EOS to both answers."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(3)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(4, 128, (n,), generator=g).tolist())

    return Dataset.from_list([{"prompt": words(p) + " ", "chosen": words(c), "rejected": words(r)}
                              for p, c, r in LENGTHS])


def trl_step(checkpoints: Path, tokenizer, dataset, out_dir: Path, **options) -> tuple[Step, list[dict]]:
    """trl's loss, logged metrics and gradients for the whole dataset as one batch; and trl's tokenized rows."""
    from transformers import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(checkpoints / "policy")
    reference = LlamaForCausalLM.from_pretrained(checkpoints / "reference")
    # bf16=False: trl defaults to bf16=True, under which accelerate runs the (prepared) reference model in bf16
    # autocast, on CPU too; its log-probabilities then differ by ~1e-3 from fp32. max_length=None: no truncation
    # here (test_truncation_keeps_different_ends covers it).
    args = trl.DPOConfig(output_dir=str(out_dir), report_to=[], use_cpu=True, bf16=False, beta=BETA,
                         max_length=None, per_device_train_batch_size=len(dataset), **options)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(dataset))]  # in order: the sampler would shuffle
    trainer.model.train()  # as in a training step; dropout is 0 in this model
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    loss.backward()
    trainer.log({})  # folds the step's metrics into the log, as trl reports them
    metrics = trainer.state.log_history[-1]
    grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    return Step(loss.item(), metrics, grads), rows


def llamakit_examples(checkpoints: Path, rows: list[dict]) -> PreferenceExamples:
    """trl's tokenized pairs as our examples, with the reference's log-probabilities attached (as `llamakit dpo`)."""
    pairs = [EncodedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], 0.0, False) for r in rows]
    examples = PreferenceExamples(pairs, PAD)
    batch = examples.batch(range(len(pairs)))
    with torch.no_grad():
        sums, _ = sequence_logprobs(load_model(checkpoints / "reference")(batch["input_ids"]), batch["labels"])
    examples.ref_logps = sums.view(2, -1).t()  # (P, 2)
    return examples


def llamakit_step(checkpoints: Path, examples: PreferenceExamples, cfg: DPOConfig, indices=None) -> Step:
    """Our loss and metrics per pair (the objective sums them; the loop divides by weight) and the gradients."""
    policy = load_model(checkpoints / "policy").requires_grad_(True)
    objective = DPOObjective(cfg)
    batch = examples.batch(range(examples.num_samples) if indices is None else indices)
    total, metrics = objective.loss(policy, batch)
    pairs = objective.weight(batch)
    (total / pairs).backward()
    grads = {name if name == "lm_head.weight" else f"model.{name}": p.grad for name, p in policy.named_parameters()}
    return Step(total.item() / pairs, {k: v.item() / pairs for k, v in metrics.items()}, grads)


@pytest.fixture(scope="module")
def trl_rows(checkpoints, tokenizer, dataset, tmp_path_factory) -> list[dict]:
    return trl_step(checkpoints, tokenizer, dataset, tmp_path_factory.mktemp("trl"))[1]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_metrics_and_every_gradient_equal_trl(case, checkpoints, tokenizer, dataset, tmp_path):
    options, cfg = CASES[case]
    theirs, rows = trl_step(checkpoints, tokenizer, dataset, tmp_path, **options)
    ours = llamakit_step(checkpoints, llamakit_examples(checkpoints, rows), cfg)

    assert [r["chosen_ids"][-1] for r in rows] == [EOS] * len(rows)  # trl scored the EOS it appended; so do we
    assert abs(ours.loss - theirs.loss) <= TOL * max(1, abs(theirs.loss)), (ours.loss, theirs.loss)
    if case != "ipo":  # our IPO rewards are length-normalised: test_ipo_rewards_are_per_token_ours_per_sequence_trls
        for their_key, our_key in REWARDS.items():
            assert abs(ours.metrics[our_key] - theirs.metrics[their_key]) <= TOL, their_key
    assert ours.grads.keys() == theirs.grads.keys()
    for name, grad in theirs.grads.items():
        assert (ours.grads[name] - grad).abs().max().item() <= TOL * max(1, grad.abs().max().item()), name
    # not trivially equal: the gradients are large and the loss is far from its value where π = π_ref (h = 0)
    assert max(g.abs().max().item() for g in theirs.grads.values()) > 1e-2
    at_reference = (1 / (2 * BETA)) ** 2 if cfg.loss == "ipo" else math.log(2)
    assert abs(ours.loss - at_reference) > 1e-2


def test_trl_label_smoothing_is_not_conservative_dpo(checkpoints, tokenizer, dataset, trl_rows, tmp_path):
    """Deliberate: our label_smoothing is conservative DPO's ε. trl 1.16's "sigmoid" ignores label_smoothing, and
    its "robust" loss reads it as rDPO's flip rate: S - εβh/(1-2ε) where we compute S + εβh (S = -log σ(βh))."""
    examples = llamakit_examples(checkpoints, trl_rows)
    plain = llamakit_step(checkpoints, examples, DPOConfig(beta=BETA))
    conservative = llamakit_step(checkpoints, examples, DPOConfig(beta=BETA, label_smoothing=EPS))
    trl_sigmoid, _ = trl_step(checkpoints, tokenizer, dataset, tmp_path / "sigmoid", loss_type=["sigmoid"],
                              label_smoothing=EPS)
    robust, _ = trl_step(checkpoints, tokenizer, dataset, tmp_path / "robust", loss_type=["robust"],
                         label_smoothing=EPS)

    assert abs(trl_sigmoid.loss - plain.loss) <= TOL  # ε had no effect on trl's sigmoid
    assert abs(conservative.loss - plain.loss) > 1e-3  # it does on ours
    beta_h = plain.metrics["reward_margin"]  # mean over pairs of β·h
    assert abs(conservative.loss - (plain.loss + EPS * beta_h)) <= TOL
    assert abs(robust.loss - (plain.loss - EPS * beta_h / (1 - 2 * EPS))) <= TOL
    assert abs(robust.loss - conservative.loss) > 1e-3


def test_ipo_rewards_are_per_token_ours_per_sequence_trls(checkpoints, tokenizer, dataset, trl_rows, tmp_path):
    """Deliberate, metrics only: both IPO losses use per-token (length-normalised) log-ratios and agree (above);
    our reward metrics use those same per-token ratios, trl's the summed ones (as for its other losses)."""
    theirs, _ = trl_step(checkpoints, tokenizer, dataset, tmp_path, loss_type=["ipo"])
    examples = llamakit_examples(checkpoints, trl_rows)
    ipo = DPOConfig(beta=BETA, loss="ipo")
    chosen_tokens = [len(r["chosen_ids"]) for r in trl_rows]
    rejected_tokens = [len(r["rejected_ids"]) for r in trl_rows]
    per_pair = [llamakit_step(checkpoints, examples, ipo, [i]).metrics for i in range(len(trl_rows))]

    summed_chosen = sum(m["reward_chosen"] * n for m, n in zip(per_pair, chosen_tokens)) / len(per_pair)
    summed_rejected = sum(m["reward_rejected"] * n for m, n in zip(per_pair, rejected_tokens)) / len(per_pair)
    assert abs(summed_chosen - theirs.metrics["rewards/chosen"]) <= TOL
    assert abs(summed_rejected - theirs.metrics["rewards/rejected"]) <= TOL
    ours = llamakit_step(checkpoints, examples, ipo).metrics
    assert abs(ours["reward_chosen"] - theirs.metrics["rewards/chosen"]) > 1e-3


def test_nll_term_averages_per_answer_trls_sft_per_token(checkpoints, tokenizer, dataset, trl_rows, tmp_path):
    """Deliberate: our nll_weight (Llama 3) adds the mean over pairs of each chosen answer's mean token NLL; trl's
    "sft" loss adds the mean over every chosen token of the batch. They agree only when the answers are equally long
    (here they are not: 5, 10 and 7 tokens)."""
    weight = 0.2
    theirs, _ = trl_step(checkpoints, tokenizer, dataset, tmp_path, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, weight])
    examples = llamakit_examples(checkpoints, trl_rows)
    plain = llamakit_step(checkpoints, examples, DPOConfig(beta=BETA))
    ours = llamakit_step(checkpoints, examples, DPOConfig(beta=BETA, nll_weight=weight))

    batch = examples.batch(range(examples.num_samples))
    with torch.no_grad():
        sums, counts = sequence_logprobs(load_model(checkpoints / "policy")(batch["input_ids"]), batch["labels"])
    P = examples.num_samples
    per_token = -sums[:P].sum() / counts[:P].sum()
    per_answer = (-sums[:P] / counts[:P]).mean()
    assert abs(theirs.loss - (plain.loss + weight * per_token.item())) <= TOL
    assert abs(ours.loss - (plain.loss + weight * per_answer.item())) <= TOL
    assert abs(ours.loss - theirs.loss) > 1e-3


def test_truncation_keeps_different_ends(assets):
    """Deliberate: over max_length, trl ("keep_start", its only non-deprecated mode) keeps each sequence's first
    tokens, so a long prompt crowds out the answer (and trl drops a pair whose prompt alone fills max_length); we keep
    the prompt's last tokens and at least max_len/2 of each answer's first ones (data/preference.encode_pair)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from llamakit import load_tokenizer

    tok = load_tokenizer(assets / "llama2" / "tokenizer.model")
    pair = PreferencePair([{"role": "user", "content": "word " * 60 + "last question?"}], "yes " * 30, "no")
    whole = encode_pair(tok, pair, "llama2", max_len=10_000)
    max_len = 40
    assert len(whole.prompt) > max_len and not whole.truncated

    theirs = DataCollatorForPreference(pad_token_id=tok.pad_id, max_length=max_len)(
        [{"prompt_ids": whole.prompt, "chosen_ids": whole.chosen, "rejected_ids": whole.rejected}])
    assert theirs["input_ids"][0].tolist() == whole.prompt[:max_len]  # the prompt's start only
    assert theirs["completion_mask"].sum() == 0  # nothing left to score

    ours = encode_pair(tok, pair, "llama2", max_len=max_len)
    assert ours.truncated and ours.prompt == whole.prompt[-len(ours.prompt):]  # the prompt's end ...
    assert ours.chosen == whole.chosen[:max_len // 2] and ours.rejected == whole.rejected  # ... and the answers
