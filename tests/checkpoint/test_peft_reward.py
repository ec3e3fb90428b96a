"""Reward adapters (PEFT's SEQ_CLS LoRA: the LoRA weights and the score head) and Hugging Face reward models, both
ways between llamakit and peft/transformers, on tiny random models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llamakit import load_model
from llamakit.checkpoint import load_reward_model
from llamakit.checkpoint.peft import load_adapter, save_adapter
from llamakit.errors import CheckpointError
from llamakit.model.lora import LoRAConfig, apply_lora
from llamakit.model.prefix import PrefixConfig, apply_prompt_tuning
from llamakit.model.reward import ScoreHead, apply_reward_head, is_reward_model
from tests.helpers import hf_llama, random_tokens

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

TOL = 1e-4
ARCH = dict(num_attention_heads=4, num_key_value_heads=2)
LORA = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
PAD = 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    hf_llama(**ARCH).save_pretrained(folder)
    return folder


def _tokens():
    return random_tokens(128, length=12).clamp(min=PAD + 1)  # no padding: transformers scores the last token


def _ours(model, tokens):
    return model(tokens)[:, -1, 0]  # (B,) the score at the last token


def _their_classifier(base, labels=1):
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(base, num_labels=labels, pad_token_id=PAD).eval()


def _reward_adapter(base, folder):
    """A reward model whose LoRA and head are perturbed (as if trained), saved as an adapter in folder."""
    model = apply_reward_head(load_model(base))
    apply_lora(model, LORA)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name == "lm_head.weight":
                p.add_(0.3 * torch.randn_like(p))
    save_adapter(folder, model, LORA, base=str(base))
    return model.eval()


def test_peft_scores_our_reward_adapter_as_we_do(base, tmp_path):
    model = _reward_adapter(base, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys and len(keys) == 2 * 3 * 2 + 1
    theirs = peft.PeftModel.from_pretrained(_their_classifier(base), tmp_path / "adapter").eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (_ours(model, tokens) - theirs(input_ids=tokens).logits[:, 0]).abs().max() <= TOL
        reloaded = load_reward_model(base, adapter=tmp_path / "adapter")
        assert (_ours(reloaded, tokens) - _ours(model, tokens)).abs().max() == 0


def test_a_reward_adapter_written_by_peft_loads(base, tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(_their_classifier(base), config).eval()
    theirs.save_pretrained(tmp_path / "theirs")  # modules_to_save ["classifier", "score"], as PEFT writes it
    model = load_model(base)
    assert load_adapter(model, tmp_path / "theirs") == "lora"
    assert isinstance(model.lm_head, ScoreHead)
    tokens = _tokens()
    with torch.no_grad():
        assert (_ours(model, tokens) - theirs(input_ids=tokens).logits[:, 0]).abs().max() <= TOL


def test_a_classifier_with_several_labels_is_refused(base, tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"])
    peft.get_peft_model(_their_classifier(base, labels=2), config).save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="score head has 2 outputs"):
        load_reward_model(base, adapter=tmp_path / "two")
    _their_classifier(base, labels=2).save_pretrained(tmp_path / "two-whole")
    with pytest.raises(CheckpointError, match="with 2 labels"):
        load_model(tmp_path / "two-whole")


def test_a_hugging_face_reward_model_loads_as_one(base, tmp_path):
    theirs = _their_classifier(base)
    with torch.no_grad():
        theirs.score.weight.normal_()
    theirs.save_pretrained(tmp_path / "rm")  # as transformers writes it: id2label with one label
    model = load_reward_model(tmp_path / "rm")
    assert is_reward_model(model) and model.lm_head.weight.dtype == torch.float32
    tokens = _tokens()
    with torch.no_grad():
        assert (_ours(model, tokens) - theirs(input_ids=tokens).logits[:, 0]).abs().max() <= TOL


def test_a_reward_model_adapter_is_lora(base, tmp_path):
    model = apply_reward_head(load_model(base))
    apply_prompt_tuning(model, PrefixConfig(num_virtual_tokens=4))
    with pytest.raises(CheckpointError, match="reward model's adapter must be LoRA"):
        save_adapter(tmp_path / "adapter", model, PrefixConfig(num_virtual_tokens=4))
    assert not (tmp_path / "adapter").exists()
