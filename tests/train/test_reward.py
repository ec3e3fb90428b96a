"""Reward models: the ranking loss against its closed form, scores independent of the batch, a run that learns a
clear preference and a saved model that reloads with the same scores."""

import json
import math

import pytest
import torch

from llamakit import load_model
from llamakit.data.preference import EncodedPair, RewardExamples
from llamakit.model import ModelConfig, Transformer
from llamakit.model.reward import ScoreHead, apply_reward_head, masked_scores, scores
from llamakit.train import parse_config
from llamakit.train.preference import RewardConfig, ranking_losses
from llamakit.train.reward import RewardRunConfig, reward
from tests.helpers import CLEAR_CHOICE, write_clear_preferences

CONFIG = "configs/reward/tiny-reward.yaml"


def test_the_ranking_loss_equals_its_closed_form():
    chosen, rejected, margin = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]), torch.tensor([0.5, 0.0])
    expected = torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))])  # -log σ(r_c - r_r - m)
    assert torch.allclose(ranking_losses(chosen, rejected, margin, RewardConfig()), expected)
    assert torch.allclose(ranking_losses(chosen, rejected, margin, RewardConfig(loss="log_exp")), expected)
    no_margin = ranking_losses(chosen, rejected, margin, RewardConfig(use_margins=False))
    assert no_margin[0].item() == pytest.approx(math.log1p(math.exp(-1.0)))
    centred = ranking_losses(chosen, rejected, margin, RewardConfig(center=0.01))
    assert torch.allclose(centred - expected, 0.01 * torch.tensor([9.0, 4.0]))


def test_a_score_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = apply_reward_head(Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16,
                                                      max_seq_len=32))).eval()
    assert isinstance(model.lm_head, ScoreHead) and not model.config.tie_word_embeddings
    pairs = [EncodedPair([1, 5, 9], [7, 2], [3], 1.0, False), EncodedPair([1, 4], [8, 8, 8, 6], [2, 2], 0.0, False)]
    examples = RewardExamples(pairs, pad_id=0)
    with torch.no_grad():
        together = scores(model, *(examples.batch([0, 1])[k] for k in ("input_ids", "last")))
        alone = [scores(model, *(examples.batch([i])[k] for k in ("input_ids", "last"))) for i in (0, 1)]
    assert torch.allclose(together, torch.cat([alone[0][:1], alone[1][:1], alone[0][1:], alone[1][1:]]), atol=1e-6)
    assert examples.batch([0, 1])["margin"].tolist() == [1.0, 0.0]
    # Hugging Face's padded form, padded on the left or on the right: the same scores.
    rows = [[1, 5, 9, 7, 2], [1, 4, 2, 2]]
    for side in ("left", "right"):
        ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
        for r, row in enumerate(rows):
            where = slice(6 - len(row), 6) if side == "left" else slice(0, len(row))
            ids[r, where], mask[r, where] = torch.tensor(row), 1
        with torch.no_grad():
            got = masked_scores(model, ids, mask)
        assert torch.allclose(got, torch.stack([alone[0][0], alone[1][1]]), atol=1e-6), side


def test_a_reward_model_learns_a_clear_preference_and_reloads(assets, tmp_path):
    data = write_clear_preferences(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    args = ["--model.path", str(assets / "tinyllamas" / "stories260K.bin"),
            "--model.tokenizer", str(assets / "tinyllamas" / "tok512.model"), "--data.path", str(data),
            "--data.seq_len", "128", "--data.val_fraction", "0.12", "--train.batch_size", "8",
            "--train.micro_batch_size", "8", "--train.device", "cpu", "--train.max_steps", "6", "--eval.every", "3",
            "--checkpoint.every", "3", "--log.every", "1", "--log.tensorboard", "false", "--log.plot", "false",
            "--checkpoint.out_dir", str(out)]
    final = reward(parse_config(CONFIG, args, RewardRunConfig))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "val_loss" in r}
    assert val[6]["val_accuracy"] == 1.0 and val[6]["val_loss"] < val[0]["val_loss"]
    reloaded = load_model(final)
    assert isinstance(reloaded.lm_head, ScoreHead)
    from llamakit import load_tokenizer
    from llamakit.data.preference import PreferencePair, encode_pair

    tok = load_tokenizer(assets / "tinyllamas" / "tok512.model")
    pair = PreferencePair([{"role": "user", "content": "Tell me story number 99."}], *CLEAR_CHOICE)
    batch = RewardExamples([encode_pair(tok, pair, "llama2", 128)], tok.pad_id).batch([0])
    with torch.no_grad():
        chosen, rejected = scores(reloaded, batch["input_ids"], batch["last"])
    assert chosen > rejected  # the saved model is the trained one: it prefers the story on an unseen prompt


def test_a_reward_model_saved_for_hugging_face_scores_the_same_in_transformers(assets, tmp_path):
    from transformers import LlamaForSequenceClassification

    from llamakit import load_tokenizer, save_model

    torch.manual_seed(0)
    model = apply_reward_head(load_model(assets / "tinyllamas" / "stories260K.bin")).eval()
    tok = load_tokenizer(assets / "tinyllamas" / "tok512.model")
    save_model(model, tmp_path / "rm-hf", "hf", tokenizer=tok)
    theirs = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm-hf").eval()
    for text in ("Once upon a time", "The dog ran to the park and found a big red ball."):
        ids = torch.tensor([tok.encode(text, bos=True)])
        with torch.no_grad():
            ours = scores(model, ids, torch.tensor([ids.size(1) - 1]))
            expected = theirs(input_ids=ids).logits[:, 0]
        assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)


def test_two_processes_train_a_reward_model_as_one_and_a_killed_run_resumes_exactly(assets, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import kill_when_exists

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    hh = assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz"

    def command(out, *launcher):
        settings = {"model.path": assets / "tinyllamas" / "stories260K.bin",
                    "model.tokenizer": assets / "tinyllamas" / "tok512.model", "data.path": hh,
                    "data.max_examples": 64, "data.val_fraction": 0.12, "data.seq_len": 128, "train.batch_size": 8,
                    "train.micro_batch_size": 4, "train.device": "cpu", "train.max_steps": 4, "eval.every": 2,
                    "eval.batches": 1, "checkpoint.every": 2, "log.tensorboard": "false", "log.plot": "false",
                    "checkpoint.out_dir": out}
        return [sys.executable, *launcher, "-m", "llamakit", "reward", CONFIG,
                *(item for key, value in settings.items() for item in (f"--{key}", str(value)))]

    def metrics(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("accuracy")) for r in rows]

    one, two, broken = tmp_path / "one", tmp_path / "two", tmp_path / "broken"
    subprocess.run(command(one), env=env, check=True, capture_output=True)
    done = subprocess.run(command(two, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                  "29543"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for (s1, *a), (s2, *b) in zip(metrics(one), metrics(two), strict=True):
        assert s1 == s2 and all(x == y or abs(x - y) < 1e-5 * max(1, abs(x)) for x, y in zip(a, b)), (a, b)
    kill_when_exists(command(broken), broken / "step-2", env)
    resumed = subprocess.run([*command(broken), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics(broken) == metrics(one)
