"""A fine-tuned model or adapter records the prompt format it learned (alpaca, llama2, llama3); chat prompts in it."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llamakit import Llama, load_model
from llamakit.checkpoint.peft import save_adapter
from llamakit.cli import main
from llamakit.data.sft import encode_alpaca, encode_chat
from llamakit.errors import LlamakitError
from llamakit.generate import chat as chat_module
from llamakit.model.lora import LoRAConfig, apply_lora
from llamakit.tokenizer import load_tokenizer
from llamakit.tokenizer.chat import alpaca_prompt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(assets) -> dict[str, Path]:
    return {"bin": assets / "tinyllamas" / "stories260K.bin", "tok": assets / "tinyllamas" / "tok512.model",
            "alpaca": assets / "sft" / "alpaca_tiny.json"}


@pytest.fixture(scope="module")
def alpaca_adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter (untrained: B = 0) of a model tuned on the Alpaca template, as finetune writes it."""
    model = load_model(tiny["bin"])
    model.config = model.config.replace(chat_format="alpaca")
    apply_lora(model, LoRAConfig())
    return save_adapter(tmp_path_factory.mktemp("alpaca") / "adapter", model, LoRAConfig())


def recorded_format(adapter: Path) -> str | None:
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        return f.metadata().get("llamakit_chat_format")


def chat_prompts(monkeypatch, capsys, args: list, lines: list[str]) -> tuple[list[list[int]], list[str], str]:
    """Run `llamakit chat ARGS` on the typed lines; (the prompt ids of each reply, the replies, the banner)."""
    prompts = []

    def spy(model, tokenizer, prompt, *rest, **kwargs):
        prompts.append(list(prompt))
        return real_stream(model, tokenizer, prompt, *rest, **kwargs)

    real_stream = chat_module.stream
    monkeypatch.setattr(chat_module, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    capsys.readouterr()
    assert main(["chat", *map(str, args), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    banner, *replies, end = capsys.readouterr().out.split("\n>>> ")
    assert end == "\n"
    return prompts, [r.removesuffix("\n") for r in replies], banner


def test_chat_with_an_alpaca_adapter_prompts_as_the_adapter_was_trained(tiny, alpaca_adapter, monkeypatch, capsys):
    assert recorded_format(alpaca_adapter) == "alpaca"
    args = ["--checkpoint", tiny["bin"], "--tokenizer", tiny["tok"], "--adapter", alpaca_adapter]
    prompts, replies, banner = chat_prompts(monkeypatch, capsys, args, ["Name three colors.", "And two more?"])
    assert "(alpaca format)" in banner

    tok = load_tokenizer(tiny["tok"])
    trained = encode_alpaca(tok, {"instruction": "Name three colors.", "output": "Red, green and blue."})
    context = [i for i, target in zip(trained.input_ids, trained.labels) if not target]  # what training prompted with
    assert prompts[0] == context == tok.encode(alpaca_prompt("Name three colors."), bos=True)
    # The next turn: the finished exchange as its own BOS..EOS sequence, then the new instruction.
    exchange = tok.encode(alpaca_prompt("Name three colors.") + replies[0], bos=True, eos=True)
    assert prompts[1] == exchange + tok.encode(alpaca_prompt("And two more?"), bos=True)


def test_alpaca_chat_data_trains_on_the_same_ids_as_alpaca_rows(tiny):
    tok = load_tokenizer(tiny["tok"])
    dialog = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}]
    assert encode_chat(tok, dialog, "alpaca") == encode_alpaca(tok, {"instruction": "Name a color.", "output": "Red."})


def test_the_base_alone_and_chat_format_override_keep_their_formats(tiny, alpaca_adapter, monkeypatch, capsys):
    base = ["--checkpoint", tiny["bin"], "--tokenizer", tiny["tok"]]
    tok = load_tokenizer(tiny["tok"])
    prompts, _, banner = chat_prompts(monkeypatch, capsys, base, ["Hi"])
    assert "(llama2 format)" in banner and prompts[0] == tok.encode("[INST] Hi [/INST]", bos=True)
    prompts, _, banner = chat_prompts(monkeypatch, capsys, [*base, "--adapter", alpaca_adapter, "--chat-format",
                                                            "llama2"], ["Hi"])
    assert "(llama2 format)" in banner and prompts[0] == tok.encode("[INST] Hi [/INST]", bos=True)


def test_the_api_uses_the_adapters_format(tiny, alpaca_adapter):
    llama = Llama.build(tiny["bin"], tiny["tok"], 256, 1, adapter_path=alpaca_adapter)
    assert llama.chat_format == "alpaca"
    reply = llama.chat_completion([[{"role": "user", "content": "[INST] Name a color. [/INST]"}]], temperature=0,
                                  max_gen_len=8)[0]["generation"]["content"]
    assert reply == llama.text_completion([alpaca_prompt("[INST] Name a color. [/INST]")], temperature=0,
                                          max_gen_len=8)[0]["generation"]  # Llama 2's tags mean nothing here
    with pytest.raises(LlamakitError, match="the alpaca format has no system message"):
        llama.chat_completion([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]])


def test_peft_reads_the_adapter_config_without_a_complaint(alpaca_adapter):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PEFT's "Unexpected keyword arguments" for a key it does not know
        config = peft.PeftConfig.from_pretrained(alpaca_adapter)
    assert (config.peft_type, config.r) == ("LORA", 8)


def test_a_bad_recorded_format_is_a_clear_error(tiny, alpaca_adapter, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((alpaca_adapter / "adapter_config.json").read_bytes())
    with safe_open(alpaca_adapter / "adapter_model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(alpaca_adapter / "adapter_model.safetensors"), bad / "adapter_model.safetensors",
              metadata={**metadata, "llamakit_chat_format": "chatml"})
    capsys.readouterr()
    assert main(["generate", "Hi", "--checkpoint", str(tiny["bin"]), "--tokenizer", str(tiny["tok"]), "--adapter",
                 str(bad)]) == 1
    err = capsys.readouterr().err
    assert "the recorded chat format 'chatml' is not one of llama2, llama3, alpaca" in err
    assert len(err.splitlines()) == 1


def test_finetune_records_the_format_it_trained_on(tiny, tmp_path, monkeypatch, capsys):
    chat_rows = tmp_path / "chat.jsonl"
    chat_rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {n}."},
                                                          {"role": "assistant", "content": f"{n}."}]}) + "\n"
                                 for n in range(12)))
    quick = ["--model.path", tiny["bin"], "--model.tokenizer", tiny["tok"], "--data.max_examples", "12",
             "--data.seq_len", "256", "--data.val_fraction", "0.2", "--train.max_steps", "1", "--train.batch_size", "2",
             "--train.micro_batch_size", "2", "--train.device", "cpu", "--eval.every", "0", "--checkpoint.every", "0",
             "--log.tensorboard", "false", "--log.plot", "false"]
    runs = {"full": ["--method.name", "full", "--data.path", tiny["alpaca"], "--data.format", "alpaca"],
            "lora": ["--method.name", "lora", "--data.path", chat_rows, "--data.format", "chat",
                     "--data.chat_format", "llama2"]}
    for name, args in runs.items():
        out_dir = tmp_path / name
        assert main(["finetune", str(REPO / "configs" / "finetune" / "tiny-lora.yaml"), *map(str, quick + args),
                     "--checkpoint.out_dir", str(out_dir)]) == 0
    full_config = json.loads((tmp_path / "full" / "final" / "config.json").read_text())
    assert full_config["llamakit"]["model"]["chat_format"] == "alpaca"
    assert recorded_format(tmp_path / "lora" / "final") == "llama2"
    _, _, banner = chat_prompts(monkeypatch, capsys, ["--checkpoint", tmp_path / "full" / "final"], ["Hi"])
    assert "(alpaca format)" in banner
