"""Rejection sampling on the real stories260K: K batched samples per prompt, the reward model's argmax kept (checked
against scores computed independently), pooling across rounds, Llama 2's reward combination, a fine-tune on the
output, and the command end to end."""

import json
import math

import pytest
import torch

from llamakit import load_checkpoint, load_model, save_model
from llamakit.cli import main
from llamakit.data.preference import Prompt
from llamakit.errors import CheckpointError, ConfigError, DataError
from llamakit.generate import SamplingParams
from llamakit.model.reward import apply_reward_head, scores
from llamakit.tokenizer.chat import encode_exchanges
from llamakit.train import parse_config
from llamakit.train import rejection as rejection_module
from llamakit.train.finetune import FinetuneConfig, finetune
from llamakit.train.rejection import RejectionConfig, RejectionRound, rejection_sample
from llamakit.train.rewards import Reward, RewardModel, combined_reward, uses_safety
from tests.conftest import REPO

PROMPTS = [{"prompt": "Tell me a story about a cat."}, {"prompt": "What is the sun?", "safety": True},
           {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"}]}]
K = 4
SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory, one_thread):
    """The policy's files, two reward model folders with different random score heads, and a prompts file."""
    folder = tmp_path_factory.mktemp("rejection")
    tiny = {"bin": assets / "tinyllamas" / "stories260K.bin", "tok": assets / "tinyllamas" / "tok512.model"}
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(apply_reward_head(load_model(tiny["bin"])), folder / f"rm{seed}", tokenizer=tiny["tok"])
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return {**tiny, "rm": folder / "rm0", "other_rm": folder / "rm1", "prompts": prompts, "dir": folder}


@pytest.fixture(scope="module")
def policy(files):
    return load_checkpoint(files["bin"], files["tok"])


@pytest.fixture(scope="module")
def reward(files):
    return Reward(RewardModel.load(files["rm"], batch_size=3))


def _round(files, policy, reward, name, **options):
    """Run one round into files['dir'] / name; (summary, rows)."""
    params = options.pop("params", SAMPLING)
    cfg = RejectionConfig(str(files["prompts"]), str(files["dir"] / name), samples=K, batch_size=5,
                          max_new_tokens=16, **options)
    summary = rejection_sample(*policy, reward, cfg, params)
    return summary, [json.loads(line) for line in (files["dir"] / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def first_round(files, policy, reward):
    return _round(files, policy, reward, "round1.jsonl")


def _independent_score(files, messages, answer):
    """The reward model's score of one answer, encoded and scored alone (no batching, padding or sorting)."""
    model, tokenizer = load_checkpoint(files["rm"])
    exchanges = encode_exchanges(tokenizer, [*messages, {"role": "assistant", "content": answer}], "llama2")
    ids = torch.tensor([[i for p, a in exchanges for i in p + a]])
    return scores(model, ids, torch.tensor([ids.size(1) - 1])).item()


def test_the_kept_answer_is_the_reward_models_argmax(files, first_round):
    summary, rows = first_round
    assert [r["messages"][:-1] for r in rows] == [[{"role": "user", "content": "Tell me a story about a cat."}],
                                                  [{"role": "user", "content": "What is the sun?"}],
                                                  PROMPTS[2]["messages"]]
    for row in rows:
        recomputed = [_independent_score(files, row["messages"][:-1], a) for a in row["candidates"]]
        assert row["scores"] == pytest.approx(recomputed, abs=1e-5)
        best = max(range(K), key=recomputed.__getitem__)
        assert row["kept"] == best and row["messages"][-1] == {"role": "assistant", "content": row["candidates"][best]}
        assert row["score"] == row["scores"][best] and row["pooled_from"] is None and row["samples"] == K
    assert [r["safety"] for r in rows] == [False, True, False]
    assert summary["prompts"] == 3 and summary["samples"] == 3 * K
    assert summary["mean_best_score"] == pytest.approx(sum(r["score"] for r in rows) / 3)
    assert summary["mean_score"] == pytest.approx(sum(sum(r["scores"]) for r in rows) / (3 * K))
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0


def test_ties_keep_the_first_best():
    row = rejection_module.best_row(Prompt([{"role": "user", "content": "q"}]), ["a", "b", "c"], [0.5, 2.0, 2.0],
                                    None, "llama2", {})
    assert row["kept"] == 1 and row["messages"][-1]["content"] == "b"


def test_samples_are_decoded_in_batches_on_one_cache(files, policy, reward, monkeypatch):
    calls = []

    def spy(model, tokenizer, prompts, *args, cache=None, **kwargs):
        calls.append((len(prompts), cache))
        return generate(model, tokenizer, prompts, *args, cache=cache, **kwargs)

    generate = rejection_module.generate
    monkeypatch.setattr(rejection_module, "generate", spy)
    _, rows = _round(files, policy, reward, "batched.jsonl")
    assert [n for n, _ in calls] == [5, 5, 2]  # 3 prompts x K = 12 sequences, batch size 5
    assert calls[0][1] is not None and all(cache is calls[0][1] for _, cache in calls)
    for row in rows:
        assert len(row["candidates"]) == K and len(set(row["candidates"])) > 1  # distinct draws at temperature 1


def test_a_seed_reproduces_the_samples_whatever_the_batch_size(files, policy, reward, first_round):
    cfg = RejectionConfig(str(files["prompts"]), str(files["dir"] / "one_batch.jsonl"), samples=K, batch_size=3 * K,
                          max_new_tokens=16)
    rejection_sample(*policy, reward, cfg, SAMPLING)
    again = [json.loads(line) for line in (files["dir"] / "one_batch.jsonl").read_text().splitlines()]
    assert [r["candidates"] for r in again] == [r["candidates"] for r in first_round[1]]


def test_finetune_trains_on_the_output(files, first_round, tmp_path):
    data = str(files["dir"] / "round1.jsonl")
    overrides = ["--model.path", str(files["bin"]), "--model.tokenizer", str(files["tok"]), "--data.path", data,
                 "--data.val_path", data, "--data.format", "chat", "--data.seq_len", "64", "--data.packing", "false",
                 "--train.max_steps", "2", "--train.batch_size", "2", "--train.micro_batch_size", "2",
                 "--train.device", "cpu", "--eval.every", "2", "--eval.batches", "1", "--checkpoint.every", "2",
                 "--checkpoint.out_dir", str(tmp_path / "run"), "--log.every", "1", "--log.tensorboard", "false",
                 "--log.plot", "false"]
    final = finetune(parse_config(REPO / "configs" / "finetune" / "tiny-sft.yaml", overrides, FinetuneConfig))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (final / "model.safetensors").is_file()
    assert {r["step"] for r in metrics if "loss" in r} >= {1, 2}
    assert all(math.isfinite(r["loss"]) for r in metrics if "loss" in r)


def test_pooling_keeps_an_earlier_answer_that_scores_higher(files, policy, reward, first_round):
    earlier = first_round[1]
    earlier[0] = {**earlier[0], "score": 1e3, "messages": [*earlier[0]["messages"][:-1],
                                                           {"role": "assistant", "content": "an old winner"}]}
    pool = files["dir"] / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in earlier))
    summary, rows = _round(files, policy, reward, "round2.jsonl", pool=[str(pool)],
                           params=SamplingParams(temperature=1.0, top_p=1.0, seed=7))
    assert rows[0]["messages"][-1]["content"] == "an old winner" and rows[0]["score"] == 1e3
    assert rows[0]["pooled_from"] == str(pool) and rows[0]["kept"] is None
    for old, new in zip(earlier[1:], rows[1:]):  # the better of the earlier answer and this round's best
        assert new["score"] == max(old["score"], max(new["scores"]))
        kept = old["messages"][-1]["content"] if old["score"] > max(new["scores"]) else new["candidates"][new["kept"]]
        assert new["messages"][-1]["content"] == kept
    assert summary["pool_matches"] == 3 and summary["kept_from_pool"] >= 1


def test_pooling_rows_of_another_reward_model_is_refused(files, first_round):
    other = Reward(RewardModel.load(files["other_rm"]))
    cfg = RejectionConfig(str(files["prompts"]), str(files["dir"] / "never.jsonl"), pool=[str(files["dir"] /
                                                                                               "round1.jsonl")])
    with pytest.raises(DataError, match="not comparable.*same --reward-model"):
        RejectionRound(cfg, other)
    assert not (files["dir"] / "never.jsonl").exists()


def test_llama2_combination_rule():
    helpful = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    safe = torch.logit(torch.tensor([0.9, 0.10, 0.14, 0.16, 0.9]))  # raw scores whose sigmoid is the paper's score
    is_safety = [True, True, False, False, False]
    # a safety prompt takes R_s; otherwise R_s only when sigmoid(R_s) < 0.15, else R_h
    expected = torch.stack([safe[0], safe[1], safe[2], helpful[3], helpful[4]])
    assert torch.equal(combined_reward(helpful, safe, is_safety), expected)
    assert uses_safety(safe, is_safety).tolist() == [True, True, True, False, False]
    assert combined_reward(helpful, safe, is_safety, threshold=0.5).tolist()[3] == pytest.approx(safe[3].item())
    with pytest.raises(ConfigError, match="0.15"):
        combined_reward(helpful, safe, is_safety, threshold=1.5)


def test_two_reward_models_combine_by_the_rule(files):
    helpful, safe = RewardModel.load(files["rm"]), RewardModel.load(files["other_rm"])
    prompts = [Prompt([{"role": "user", "content": "Hi"}], safety=s) for s in (False, True, False)]
    answers = ["Hello there.", "I will not.", "zq xv"]
    got = Reward(helpful, safe, threshold=0.5)(prompts, answers)
    dialogs = [p.messages for p in prompts]
    r_h, r_s = helpful.score(dialogs, answers), safe.score(dialogs, answers)
    assert torch.equal(got, combined_reward(r_h, r_s, [False, True, False], 0.5))
    assert set(Reward(helpful, safe).identity()) == {"reward_model", "reward_head", "safety_reward_model",
                                                     "safety_head", "safety_threshold"}


def test_a_language_model_is_refused_as_reward_model(files):
    with pytest.raises(CheckpointError, match="not a reward model"):
        RewardModel(*load_checkpoint(files["bin"], files["tok"]), str(files["bin"]))


def test_the_command_end_to_end(files, capsys):
    out = files["dir"] / "cli.jsonl"
    args = ["rejection-sample", "--checkpoint", str(files["bin"]), "--tokenizer", str(files["tok"]), "--prompts",
            str(files["prompts"]), "--reward-model", str(files["rm"]), "--samples", "2", "--max-new-tokens", "8",
            "--temperature", "1", "--seed", "3", "--batch-size", "4", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept the best of 2 samples for 3 prompts" in printed and "tokens/s" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["scores"]) == 2 for r in rows)
    assert main(args) == 1  # the output exists: refused without --force
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force", "--pool", str(out)]) == 0
    missing = [*args[:6], str(files["dir"] / "nope.jsonl"), *args[7:-1], str(files["dir"] / "cli2.jsonl")]
    assert main(missing) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llamakit rejection-sample: error: prompts file")
    assert not (files["dir"] / "cli2.jsonl").exists()
