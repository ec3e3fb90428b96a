"""LoRA reward models on the real stories260K: the run learns, its adapter is PEFT's sequence classification (peft and
transformers give the same scores), llamakit loads and merges it, and a killed run resumes exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llamakit import load_model, load_tokenizer, save_model
from llamakit.checkpoint import load_reward_model
from llamakit.cli import main
from llamakit.data.preference import PreferencePair, RewardExamples, encode_pair
from llamakit.errors import CheckpointError, ConfigError
from llamakit.model.lora import LoRALinear
from llamakit.model.reward import ScoreHead, scores
from llamakit.train import parse_config
from llamakit.train.reward import RewardRunConfig, reward
from tests.helpers import CLEAR_CHOICE, kill_when_exists

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

CONFIG = "configs/reward/tiny-reward-lora.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TOL = 1e-4
# The random head of seed 42 already scores the story above the gibberish: asking for the opposite makes the run
# learn its preference (validation accuracy 0 -> 1) instead of inheriting it.
PREFERRED, REFUSED = CLEAR_CHOICE[1], CLEAR_CHOICE[0]


def _write_pairs(path, count: int = 72):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"Tell me story number {i}.", "chosen": PREFERRED,
                                "rejected": REFUSED}) + "\n")
    return path


def _args(assets, out_dir, data, *overrides):
    return ["--model.path", str(assets / "tinyllamas" / "stories260K.bin"),
            "--model.tokenizer", str(assets / "tinyllamas" / "tok512.model"), "--data.path", str(data),
            "--data.seq_len", "128", "--data.val_fraction", "0.12", "--train.batch_size", "8",
            "--train.micro_batch_size", "8", "--train.device", "cpu", "--train.max_steps", "6", "--eval.every", "3",
            "--checkpoint.every", "3", "--log.every", "1", "--log.tensorboard", "false", "--log.plot", "false",
            "--checkpoint.out_dir", str(out_dir), *overrides]


def _metrics(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """One 6-step LoRA reward run: its run folder."""
    tmp = tmp_path_factory.mktemp("reward-lora")
    out = tmp / "run"
    reward(parse_config(CONFIG, _args(assets, out, _write_pairs(tmp / "pairs.jsonl")), RewardRunConfig))
    return out


@pytest.fixture(scope="module")
def tok(assets):
    return load_tokenizer(assets / "tinyllamas" / "tok512.model")


def _batch(tok, prompt="Tell me story number 99."):
    """An unseen prompt with both answers: input_ids (2, T) right-padded, last (2,)."""
    pair = PreferencePair([{"role": "user", "content": prompt}], PREFERRED, REFUSED)
    return RewardExamples([encode_pair(tok, pair, "llama2", 128)], tok.pad_id).batch([0])


def _texts(tok):
    """Unpadded sequences, one at a time: transformers scores each at its last token."""
    return [torch.tensor([tok.encode(text, bos=True)]) for text in
            ("Once upon a time", "The dog ran to the park and found a big red ball.", PREFERRED, REFUSED)]


def test_a_lora_reward_run_learns_and_saves_a_peft_sequence_classification_adapter(run):
    val_loss, val_accuracy = _metrics(run, "val_loss"), _metrics(run, "val_accuracy")
    assert val_accuracy[6] == 1.0 and val_loss[6] < 0.6 * val_loss[0], (val_accuracy, val_loss)
    for folder in (run / "step-3", run / "step-6", run / "final"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
        assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert "base_model.model.score.weight" in keys
        assert "base_model.model.model.layers.4.self_attn.v_proj.lora_B.weight" in keys
        assert len(keys) == 5 * 2 * 2 + 1  # 5 layers, 2 targets, A and B; the head
        assert not (folder / "model.safetensors").exists()  # the base is not copied


def test_peft_and_transformers_score_the_adapter_as_llamakit_does(run, assets, tok, tmp_path):
    from transformers import LlamaForSequenceClassification

    base = assets / "tinyllamas" / "stories260K.bin"
    save_model(load_model(base), tmp_path / "base-hf", "hf", tokenizer=tok)
    theirs = LlamaForSequenceClassification.from_pretrained(tmp_path / "base-hf", num_labels=1,
                                                            pad_token_id=tok.pad_id)
    theirs = peft.PeftModel.from_pretrained(theirs, run / "final").eval()
    ours = load_reward_model(base, adapter=run / "final")
    assert isinstance(ours.lm_head, ScoreHead) and isinstance(ours.layers[0].self_attn.q_proj, LoRALinear)
    assert ours.config.chat_format == "llama2"  # recorded with the adapter
    worst = 0.0
    for ids in _texts(tok):
        with torch.no_grad():
            expected = theirs(input_ids=ids).logits[:, 0]
            got = scores(ours, ids, torch.tensor([ids.size(1) - 1]))
        worst = max(worst, (got - expected).abs().max().item())
    assert worst <= TOL, worst
    with torch.no_grad():
        preferred, refused = scores(ours, *(_batch(tok)[k] for k in ("input_ids", "last")))
    assert preferred > refused  # the trained preference, on an unseen prompt


def test_load_reward_model_refuses_a_language_model(run, assets, tmp_path):
    base = assets / "tinyllamas" / "stories260K.bin"
    with pytest.raises(CheckpointError, match="a language model, not a reward model"):
        load_reward_model(base)
    adapter = tmp_path / "causal"
    adapter.mkdir()
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM",
                                                             "modules_to_save": None}))
    with pytest.raises(CheckpointError, match="a language model's adapter, not a reward model's"):
        load_reward_model(base, adapter=adapter)


@pytest.mark.parametrize("to", ["llamakit", "hf"])
def test_merge_writes_a_whole_reward_model_with_the_same_scores(run, assets, tok, tmp_path, capsys, to):
    base = assets / "tinyllamas" / "stories260K.bin"
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(run / "final"), "--output", str(merged),
                 "--tokenizer", str(assets / "tinyllamas" / "tok512.model"), "--to", to]) == 0
    assert "reward model" in capsys.readouterr().out
    unmerged, whole = load_reward_model(base, adapter=run / "final"), load_reward_model(merged)
    assert not any(isinstance(m, LoRALinear) for m in whole.modules())
    batch = _batch(tok)
    with torch.no_grad():
        expected = scores(unmerged, batch["input_ids"], batch["last"])
        assert (scores(whole, batch["input_ids"], batch["last"]) - expected).abs().max() <= 1e-5
    if to == "hf":
        from transformers import LlamaForSequenceClassification

        theirs = LlamaForSequenceClassification.from_pretrained(merged).eval()
        ids = _texts(tok)[0]
        with torch.no_grad():
            got = scores(whole, ids, torch.tensor([ids.size(1) - 1]))
            assert (theirs(input_ids=ids).logits[:, 0] - got).abs().max() <= TOL


def test_a_killed_lora_reward_run_resumes_with_identical_losses(assets, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl")

    def command(out):
        return [sys.executable, "-m", "llamakit", "reward", CONFIG, *_args(assets, out, data)]

    whole = tmp_path / "whole"
    subprocess.run(command(whole), env=ENV, check=True, capture_output=True)
    broken = tmp_path / "broken"
    kill_when_exists(command(broken), broken / "step-3", ENV)
    assert not (broken / "final").exists()
    resumed = subprocess.run([*command(broken), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for key in ("loss", "val_loss", "margin"):
        assert _metrics(broken, key) == _metrics(whole, key), key
    assert load_file(broken / "final" / "adapter_model.safetensors").keys() == \
        load_file(whole / "final" / "adapter_model.safetensors").keys()
    for name, tensor in load_file(whole / "final" / "adapter_model.safetensors").items():
        assert torch.equal(load_file(broken / "final" / "adapter_model.safetensors")[name], tensor), name


def test_a_reward_model_trains_full_or_lora_only():
    with pytest.raises(ConfigError, match="reward models train full or lora"):
        parse_config(CONFIG, ["--method.name", "prefix"], RewardRunConfig)


def test_rejection_sampling_and_ppo_read_a_lora_reward_model_as_its_merged_whole(run, assets, tok):
    from llamakit.data.preference import Prompt
    from llamakit.train.rewards import Reward, RewardModel

    loaded = RewardModel.load(run / "final")  # the base named in adapter_config.json, the adapter merged in
    direct = load_reward_model(assets / "tinyllamas" / "stories260K.bin", adapter=run / "final")
    batch = _batch(tok)
    with torch.no_grad():
        expected = scores(direct, batch["input_ids"], batch["last"])
    prompt = Prompt([{"role": "user", "content": "Tell me story number 99."}])
    got = Reward(loaded)([prompt, prompt], [PREFERRED, REFUSED])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
