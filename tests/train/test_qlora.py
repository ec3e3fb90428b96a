"""QLoRA: NF4 layers against the NF4 definition, a QLoRA run on stories260K, its adapter in PEFT
on the dequantized base, `llamakit merge` on it, and a one-line error without bitsandbytes."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamakit import load_model
from llamakit.checkpoint import load_checkpoint, save_model
from llamakit.checkpoint.peft import load_adapter, read_adapter_config, read_adapter_weights
from llamakit.cli import main
from llamakit.model.lora import apply_lora, disable_lora, merge_lora
from llamakit.model.nf4 import NF4, NF4Linear, apply_nf4
from llamakit.train import parse_config
from llamakit.train.finetune import FinetuneConfig
from tests.conftest import SHARED_ASSETS
from tests.helpers import random_tokens

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency: pip install -e '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "finetune"
BASE = SHARED_ASSETS / "tinyllamas" / "stories260K.bin"
TOKENIZER = SHARED_ASSETS / "tinyllamas" / "tok512.model"
ALPACA = SHARED_ASSETS / "sft" / "alpaca_subset_2000.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Same model, same fp32 arithmetic, different code (attention, RoPE and matmul order): the bound the other PEFT
# parity tests use (tests/checkpoint/test_peft.py), 1e3 times below the effect of the adapter or of NF4 itself.
PEFT_TOL = 1e-4
# Merged: x @ (W + s B A)^T against x @ W^T + s B (A x), the same numbers summed in another order in fp32, through
# 5 blocks, on logits up to ~16 (an fp32 ulp there is 2e-6): 1.2e-5 measured.
MERGE_TOL = 5e-5


# The 16 NF4 levels as the QLoRA paper lists them (appendix E), to 4 decimals.
NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def _reference_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The weight bitsandbytes quantizes to NF4 with double quantization (QLoRA's), decoded by the definition: each
    4-bit index (high nibble first) picks a level, times its block's scale (the scales dequantized from 8 bits)."""
    F = bnb.functional
    q, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    levels = F.get_4bit_type("nf4", device="cpu")
    assert levels.tolist() == pytest.approx(NF4_LEVELS, abs=1e-4)
    scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset  # (blocks,)
    n = weight.numel()
    index = torch.stack((q.flatten() >> 4, q.flatten() & 15), dim=-1).flatten()[:n].long()  # (n,)
    return (levels[index] * scales[torch.arange(n) // 64]).view(weight.shape)


def test_nf4_linear_computes_with_the_nf4_weight():
    torch.manual_seed(0)
    weight = 0.02 * torch.randn(96, 160)  # rows of 2.5 blocks: blocks run across rows
    layer, reference = NF4Linear.from_weight(weight), _reference_nf4(weight)
    assert (layer.dequantized() - reference).abs().max() <= 1e-7
    x = torch.randn(2, 7, 160, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 96) and (y - x @ reference.T).abs().max() <= 1e-5
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ reference.T).square().sum().backward()
    assert (x.grad - x_ref.grad).abs().max() <= 1e-5  # the backward pass multiplies by the same weight
    x16 = x.detach().bfloat16()
    assert layer(x16).dtype == torch.bfloat16  # computes in the activations' dtype
    exact = x16.float() @ reference.T
    assert (layer(x16).float() - exact).abs().max() <= 2e-2 * exact.abs().max()
    error = (reference - weight).norm() / weight.norm()
    assert 0.05 < error < 0.12  # 4 bits on a normal weight: ~9% relative error


def test_nf4_linear_holds_4_bit_weights_and_no_float_copy():
    out_features, in_features = 512, 1024
    layer = NF4Linear.from_weight(torch.randn(out_features, in_features))
    n = out_features * in_features
    assert not list(layer.parameters())
    buffers = dict(layer.named_buffers())
    assert {k: b.dtype for k, b in buffers.items()} == {"qweight": torch.uint8, "absmax": torch.uint8, "absmax_scale":
                                                        torch.float32, "absmax_code": torch.float32,
                                                        "absmax_offset": torch.float32}
    bits = 8 * sum(b.numel() * b.element_size() for b in buffers.values()) / n
    # QLoRA §3: 4 bits, 8 / 64 for the 8-bit block scales, 32 / (64 * 256) for their fp32 scales; plus bitsandbytes'
    # 256-entry fp32 code of the 8-bit scales and their mean (1028 bytes a layer).
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 8 * 1028 / n)


@pytest.fixture(scope="module")
def shared():
    if not (BASE.is_file() and ALPACA.is_file()):
        pytest.skip(f"the real stories260K model and Alpaca subset are not in {SHARED_ASSETS} (clone with ../shared "
                    "beside the repo, or set LLAMAKIT_SHARED_ASSETS)")


def test_nf4_quantizes_each_projection_as_bitsandbytes_does_and_nothing_else(shared):
    plain = load_model(BASE, dtype="fp32")
    loaded = load_model(BASE, dtype="fp32", transforms=[NF4()])  # quantized from the stored tensors as read
    quantized = apply_nf4(load_model(BASE, dtype="fp32"))  # quantized in place, one matrix at a time
    for name, module in plain.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            assert (loaded.get_submodule(name).dequantized() - _reference_nf4(module.weight)).abs().max() <= 1e-7
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), quantized.state_dict().values()))
    state = loaded.state_dict()
    assert not any(k.endswith(f"{p}.weight") for k in state for p in PROJECTIONS)
    assert torch.equal(state["embed_tokens.weight"], plain.embed_tokens.weight)  # embeddings and (tied) head kept
    assert state["norm.weight"].dtype == torch.float32


@pytest.fixture(scope="module")
def qlora_run(shared, tmp_path_factory):
    """The run folder of 20 QLoRA steps on stories260K (the tiny preset, sized for a CPU test)."""
    run = tmp_path_factory.mktemp("qlora") / "run"
    assert main(["finetune", str(CONFIGS / "tiny-qlora.yaml"), "--model.path", str(BASE), "--model.tokenizer",
                 str(TOKENIZER), "--data.path", str(ALPACA), "--data.seq_len", "256", "--data.max_examples", "600",
                 "--train.batch_size", "8", "--train.micro_batch_size", "4", "--train.device", "cpu",
                 "--log.tensorboard", "false", "--log.plot", "false", "--eval.batches", "4", "--optim.lr", "1e-2",
                 "--train.max_steps", "20", "--eval.every", "10", "--checkpoint.every", "10",
                 "--checkpoint.out_dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def trained(qlora_run):
    """The QLoRA model as generate/chat load it: the base quantized to NF4 as it is read, then the adapter."""
    model, _ = load_checkpoint(BASE, TOKENIZER, dtype="fp32", adapter=qlora_run / "final")
    return model


def test_a_qlora_run_lowers_the_validation_loss_and_saves_a_plain_lora_adapter(qlora_run):
    rows = [json.loads(line) for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 10, 20] and val[20] < val[0] - 0.3, val
    final = qlora_run / "final"
    assert {p.name for p in final.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with safe_open(final / "adapter_model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["llamakit_base_quantization"]) == {"name": "nf4", "blocksize": 64}
        assert len(list(f.keys())) == 2 * 7 * 5  # A and B of 7 projections in 5 layers: nothing of the base
    optimizer = torch.load(qlora_run / "step-10" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == 2 * 7 * 5  # AdamW moments for the LoRA matrices only


def test_the_adapter_loads_on_the_nf4_base_it_was_trained_on(trained, qlora_run):
    tokens = random_tokens(512, length=32)
    nf4_layers = [m for m in trained.modules() if isinstance(m, NF4Linear)]
    assert len(nf4_layers) == 7 * 5
    plain_then_adapter = load_model(BASE, dtype="fp32")
    load_adapter(plain_then_adapter, qlora_run / "final")  # quantizes the loaded fp32 weights: the same codes
    nf4_base = apply_nf4(load_model(BASE, dtype="fp32"))
    with torch.no_grad():
        ours = trained(tokens)
        assert torch.equal(plain_then_adapter(tokens), ours)
        with disable_lora(trained):
            assert torch.equal(trained(tokens), nf4_base(tokens))  # LoRA off: the NF4 base alone
        assert (ours - nf4_base(tokens)).abs().max() > 0.1  # the adapter matters


def test_peft_loads_the_adapter_onto_the_dequantized_base_with_the_same_logits(trained, qlora_run, tmp_path):
    base = load_model(BASE, dtype="fp32")
    with torch.no_grad():  # the HF base: every projection as bitsandbytes quantizes and dequantizes it
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                module.weight.copy_(_reference_nf4(module.weight))
    save_model(base, tmp_path / "hf", "hf", tokenizer=TOKENIZER)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(hf, qlora_run / "final").eval()
    tokens = random_tokens(512, length=32)
    with torch.no_grad():
        theirs = reference(input_ids=tokens).logits
        ours = trained(tokens)
        on_fp32 = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(
            _hf_copy(tmp_path / "fp32"), dtype=torch.float32), qlora_run / "final").eval()(input_ids=tokens).logits
    assert (ours - theirs).abs().max() <= PEFT_TOL
    assert (ours - on_fp32).abs().max() > 100 * PEFT_TOL  # the NF4 base is not the fp32 one


def _hf_copy(folder: Path) -> Path:
    save_model(load_model(BASE, dtype="fp32"), folder, "hf", tokenizer=TOKENIZER)
    return folder


def test_merge_folds_the_adapter_into_the_dequantized_base(trained, qlora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(BASE), "--tokenizer", str(TOKENIZER), "--adapter", str(qlora_run / "final"),
                 "--output", str(out)]) == 0
    merged = load_model(out)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())  # a normal model folder
    assert "transforms" not in json.loads((out / "config.json").read_text())["llamakit"]
    onto_fp32 = load_model(BASE, dtype="fp32")  # what merging onto the unquantized base would give instead
    apply_lora(onto_fp32, read_adapter_config(qlora_run / "final"))
    onto_fp32.load_state_dict(read_adapter_weights(qlora_run / "final", onto_fp32), strict=False)
    tokens = random_tokens(512, length=32)
    with torch.no_grad():
        assert (merged(tokens) - trained(tokens)).abs().max() <= MERGE_TOL
        assert (merge_lora(onto_fp32)(tokens) - trained(tokens)).abs().max() > 0.1  # ~2 measured


def test_the_presets_parse():
    for name in ("tiny-qlora.yaml", "alpaca-qlora-7b.yaml"):
        cfg = parse_config(CONFIGS / name, [], FinetuneConfig)
        assert cfg.method.name == "qlora"
    assert (cfg.method.lora.rank, cfg.method.lora.alpha, cfg.optim.lr, cfg.optim.grad_clip) == (64, 16, 2e-4, 0.3)
    assert math.isclose(cfg.optim.min_lr_ratio, 1.0) and cfg.train.batch_size == 16  # QLoRA: constant, batch 16


def test_without_bitsandbytes_qlora_fails_in_one_line(qlora_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    cases = [["finetune", str(CONFIGS / "tiny-qlora.yaml"), "--model.path", str(BASE)],
             ["generate", "--checkpoint", str(BASE), "--tokenizer", str(TOKENIZER), "--adapter",
              str(qlora_run / "final"), "Hi"]]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "pip install bitsandbytes" in err and err.count("\n") == 1, err
