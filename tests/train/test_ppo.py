"""PPO: each piece against a straightforward computation, a verifiable reward that rises with the KL bounded,
reward models (one, or Llama 2's pair) as the reward, exact resume after SIGKILL, and 2 processes == 1."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from llamakit import load_model, save_model
from llamakit.errors import ConfigError
from llamakit.model.reward import apply_reward_head, is_reward_model
from llamakit.train import parse_config
from llamakit.train.ppo import PPORunConfig, ppo
from llamakit.train.rl import gae, kl_estimate, masked_whiten, policy_losses, value_losses
from tests.helpers import kill_when_exists

CONFIG = "configs/ppo/tiny-ppo.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
REWARD = "tests.train.ppo_rewards:sentence_ends"


def test_kl_estimators_match_their_definitions_and_k3_is_unbiased():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert kl_estimate(logps, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    expected = [math.exp(r - lp) - 1 - (r - lp) for lp, r in zip(logps.tolist(), ref.tolist())]
    assert kl_estimate(logps, ref, "k3").tolist() == pytest.approx(expected)
    # Over tokens drawn from π, E[k1] and E[k3] are both KL(π ‖ π_ref): check the exact expectations.
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    kl = float((p * (p / q).log()).sum())
    for estimator in ("k1", "k3"):
        assert float((p * kl_estimate(p.log(), q.log(), estimator)).sum()) == pytest.approx(kl, abs=1e-6)


def test_whitening_uses_only_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kept = [1.0, 2.0, 9.0, 3.0]
    mean, std = statistics.mean(kept), statistics.stdev(kept)
    out = masked_whiten(x, mask)
    assert out[mask.bool()].tolist() == pytest.approx([(v - mean) / std for v in kept], abs=1e-4)
    assert out[~mask.bool()].tolist() == [0.0, 0.0]
    assert masked_whiten(x, mask, shift_mean=False)[mask.bool()].tolist() == pytest.approx(
        [(v - mean) / std + mean for v in kept], abs=1e-4)


def _gae_by_hand(rewards, values, gamma, lam):
    """One row, written out: δ_t = r_t + γ V_{t+1} − V_t (V after the end is 0), A_t = Σ_l (γλ)^l δ_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_matches_the_sum_over_future_deltas():
    rows = [([0.0, -0.1, 1.0], [0.3, 0.5, 0.2]), ([0.5, 2.0], [1.0, -1.0])]  # the second is one token shorter
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.5, 2.0, 7.0]])
    values = torch.tensor([[0.3, 0.5, 0.2], [1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, (r, v) in enumerate(rows):
        a, ret = _gae_by_hand(r, v, 0.9, 0.8)
        assert advantages[i, :len(r)].tolist() == pytest.approx(a, abs=1e-6)
        assert returns[i, :len(r)].tolist() == pytest.approx(ret, abs=1e-6)
    assert advantages[1, 2] == 0 and returns[1, 2] == 0


def test_the_clipped_policy_and_value_losses_on_hand_cases():
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5])
    losses, clipped = policy_losses(ratios.log(), torch.zeros(4), advantages, clip=0.2)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.2)): the pessimistic one of the two
    assert losses.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8]) and clipped.tolist() == [1, 0, 0, 1]
    losses, clipped = value_losses(torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([2.0, 0.5]), clip=0.2)
    # V_old + clip(V − V_old, ±0.2) = 0.2: ½·max((1 − 2)², (0.2 − 2)²) and ½·max((1 − 0.5)², (0.2 − 0.5)²)
    assert losses.tolist() == pytest.approx([0.5 * 3.24, 0.125]) and clipped.tolist() == [1, 0]


def _args(assets, out, *overrides):
    return ["--model.path", str(assets / "tinyllamas" / "stories260K.bin"),
            "--model.tokenizer", str(assets / "tinyllamas" / "tok512.model"),
            "--data.path", str(assets / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz"),
            "--data.max_examples", "256", "--ppo.max_new_tokens", "24", "--train.device", "cpu",
            "--log.tensorboard", "false", "--log.plot", "false", "--log.every", "4",
            "--checkpoint.out_dir", str(out), *overrides]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_verifiable_reward_rises_while_the_kl_stays_bounded(assets, tmp_path, one_thread):
    out = tmp_path / "run"
    final = ppo(parse_config(CONFIG, _args(assets, out, "--ppo.reward_function", REWARD, "--ppo.kl_coef", "0.01",
                                           "--train.max_steps", "24", "--checkpoint.every", "24"), PPORunConfig))
    rows = _metrics(out)
    per_rollout = [rows[i]["reward"] for i in range(0, 24, 4)]  # 4 optimizer steps per rollout
    assert statistics.mean(per_rollout[-2:]) > 1.5 * per_rollout[0], per_rollout
    assert rows[0]["kl"] == 0 and all(r["kl"] < 25 for r in rows)  # nats per 24-token response (~16 at the end)
    for name in ("entropy", "clip_fraction", "value_loss", "policy_loss", "response_length", "rollout_tokens_per_s"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[0]["clip_fraction"] == 0 and max(r["clip_fraction"] for r in rows) > 0
    assert (final / "adapter_config.json").is_file()
    value = json.loads((out / "step-24" / "value" / "adapter_config.json").read_text())  # LoRA + the value head
    assert value["task_type"] == "SEQ_CLS" and value["modules_to_save"] == ["score"]


@pytest.fixture(scope="module")
def reward_models(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward_models")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(apply_reward_head(load_model(assets / "tinyllamas" / "stories260K.bin")), folder / f"rm{seed}",
                   tokenizer=assets / "tinyllamas" / "tok512.model")
    return folder


def test_reward_models_score_rollouts_and_initialise_the_value_model(assets, tmp_path, reward_models, one_thread):
    out = tmp_path / "run"
    args = _args(assets, out, "--ppo.reward_model", str(reward_models / "rm0"), "--ppo.safety_reward_model",
                 str(reward_models / "rm1"), "--ppo.whiten_scores", "true", "--ppo.no_eos_score", "-3",
                 "--ppo.kl_estimator", "k3", "--method.name", "full", "--train.max_steps", "4",
                 "--checkpoint.every", "4")
    final = ppo(parse_config(CONFIG, args, PPORunConfig))
    rows = _metrics(out)
    assert rows[0]["ended"] < 1 and rows[0]["score"] == pytest.approx(0, abs=1e-5)  # whitened over the rollout
    value = load_model(out / "step-4" / "value")
    start = load_model(reward_models / "rm0")
    assert value.lm_head.out_features == 1 and not torch.equal(value.lm_head.weight, start.lm_head.weight)
    assert not is_reward_model(load_model(final))  # final/ is the policy alone


def test_settings_that_cannot_resume_between_rollouts_are_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the 4 optimizer steps"):
        parse_config(CONFIG, _args(assets, tmp_path, "--ppo.reward_function", REWARD, "--train.max_steps", "6"),
                     PPORunConfig)
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config(CONFIG, _args(assets, tmp_path), PPORunConfig)


def _command(assets, out, *overrides):
    return [sys.executable, "-m", "llamakit", "ppo", CONFIG,
            *_args(assets, out, "--ppo.reward_function", REWARD, *overrides)]


def test_a_killed_run_resumes_exactly(assets, tmp_path):
    args = ("--train.max_steps", "8", "--checkpoint.every", "4")  # LoRA: policy and value adapters resume
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_command(assets, whole, *args), env=ENV, check=True, capture_output=True)
    kill_when_exists(_command(assets, broken, *args), broken / "step-4", ENV)
    assert not (broken / "final").exists()
    resumed = subprocess.run([*_command(assets, broken, *args), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    keys = ("loss", "reward", "kl", "value_loss")
    assert [{k: r[k] for k in keys} for r in _metrics(broken)] == [{k: r[k] for k in keys} for r in _metrics(whole)]


def test_two_processes_train_as_one(assets, tmp_path):
    args = ("--train.max_steps", "8", "--checkpoint.every", "0", "--train.micro_batch_size", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_command(assets, one, *args), env=ENV, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                *_command(assets, two, *args)[1:]]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("loss", "reward", "kl", "response_length", "value_loss"):
        a, b = [r[key] for r in _metrics(one)], [r[key] for r in _metrics(two)]
        assert all(abs(x - y) < 1e-4 * max(1, abs(x)) for x, y in zip(a, b)) and len(a) == len(b) == 8, (key, a, b)


def test_a_broken_reward_function_is_named(assets, tmp_path, one_thread):
    args = _args(assets, tmp_path / "run", "--ppo.reward_function", "tests.train.ppo_rewards:too_few",
                 "--train.max_steps", "4", "--checkpoint.every", "4")
    with pytest.raises(ConfigError, match="returned 31 scores for 32 responses"):
        ppo(parse_config(CONFIG, args, PPORunConfig))
