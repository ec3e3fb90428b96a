"""Fine-tuning end to end on real files: stories260K learns Alpaca with each method, answers, resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamakit.cli import main
from tests.conftest import SHARED_ASSETS
from tests.helpers import kill_when_exists

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune" / "tiny-lora.yaml"
BASE = SHARED_ASSETS / "tinyllamas" / "stories260K.bin"
TOKENIZER = SHARED_ASSETS / "tinyllamas" / "tok512.model"
ALPACA = SHARED_ASSETS / "sft" / "alpaca_subset_2000.json"
# Explicit paths (the preset's are relative to the repository root) and a CPU-sized run.
COMMON = ["--model.path", str(BASE), "--model.tokenizer", str(TOKENIZER), "--data.path", str(ALPACA),
          "--data.seq_len", "256", "--data.max_examples", "600", "--train.batch_size", "8",
          "--train.micro_batch_size", "4", "--train.device", "cpu", "--log.tensorboard", "false", "--log.plot", "false",
          "--eval.batches", "4"]
LEARNING_RATE = {"full": "2e-3", "lora": "1e-2", "prefix": "1e-2", "prompt": "3e-2"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n")


@pytest.fixture(scope="module")
def shared():
    if not (BASE.is_file() and ALPACA.is_file()):
        pytest.skip(f"the real stories260K model and Alpaca subset are not in {SHARED_ASSETS} (clone with ../shared "
                    "beside the repo, or set LLAMAKIT_SHARED_ASSETS)")


def _records(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module", params=["full", "lora", "prefix", "prompt"])
def finetuned(request, shared, tmp_path_factory):
    """(method, run folder) after 30 steps of that method."""
    run = tmp_path_factory.mktemp(request.param) / "run"
    assert main(["finetune", str(TINY), *COMMON, "--method.name", request.param, "--optim.lr",
                 LEARNING_RATE[request.param], "--train.max_steps", "30", "--eval.every", "15",
                 "--checkpoint.every", "15", "--checkpoint.out_dir", str(run)]) == 0
    return request.param, run


def test_each_method_lowers_the_validation_loss(finetuned):
    method, run = finetuned
    val = _records(run, "val_loss")
    assert sorted(val) == [0, 15, 30]
    assert val[30] < val[0] - 0.05, val


def test_adapter_runs_save_only_the_adapter(finetuned):
    method, run = finetuned
    final = {p.name for p in (run / "final").iterdir()}
    step = {p.name for p in (run / "step-15").iterdir()}
    if method == "full":
        assert {"config.json", "model.safetensors", "tokenizer.model"} <= final
        return
    adapter = {"adapter_config.json", "adapter_model.safetensors"}
    assert adapter <= final and "model.safetensors" not in final
    assert step == adapter | {"tokenizer.model", "optimizer.pt", "trainer.pt", "train_config.yaml"}
    optimizer = torch.load(run / "step-15" / "optimizer.pt", weights_only=True)
    expected = {"lora": 2 * 7 * 5, "prefix": 2 * 5, "prompt": 1}[method]  # 7 targets, 5 layers (tiny-lora.yaml)
    assert len(optimizer["state"]) == expected  # AdamW moments for the adapter's tensors and nothing else


def _model_args(method: str, run: Path) -> list[str]:
    """A full fine-tune is a model folder; an adapter goes on top of the base."""
    if method == "full":
        return ["--checkpoint", str(run / "final")]
    return ["--checkpoint", str(BASE), "--tokenizer", str(TOKENIZER), "--adapter", str(run / "final")]


def test_the_finetuned_model_answers_through_generate_and_the_api(finetuned, capsys):
    method, run = finetuned
    model = _model_args(method, run)
    capsys.readouterr()
    assert main(["generate", *model, "--temperature", "0", "--max-new-tokens", "24", PROMPT]) == 0
    answer = capsys.readouterr().out.removeprefix(PROMPT).strip()  # generate prints the prompt, then the answer
    assert answer and not answer.startswith("###")

    from llamakit.generate import Llama

    adapter = None if method == "full" else str(run / "final")
    llama = Llama.build(model[1], str(TOKENIZER), max_seq_len=256, max_batch_size=1, adapter_path=adapter)
    out = llama.text_completion([PROMPT], max_gen_len=16, temperature=0)
    start = out[0]["generation"].strip()[:10]
    assert start and answer.startswith(start)  # an empty generation would start every answer


def test_the_finetuned_model_chats(finetuned, monkeypatch, capsys):
    import io

    method, run = finetuned
    monkeypatch.setattr("sys.stdin", io.StringIO("Name three colors.\n/exit\n"))
    assert main(["chat", *_model_args(method, run), "--temperature", "0", "--max-new-tokens", "16"]) == 0
    banner, reply, _ = capsys.readouterr().out.split(">>> ")
    assert ("+ adapter" in banner) == (method != "full") and reply.strip()


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamakit", "finetune", str(TINY), *COMMON, "--method.lora.dropout", "0.1", *args]


def test_a_killed_lora_run_resumes_with_identical_losses(shared, tmp_path):
    steps = ["--train.max_steps", "24", "--checkpoint.every", "4", "--eval.every", "8"]
    whole = tmp_path / "whole"
    subprocess.run(_command(*steps, "--checkpoint.out_dir", str(whole)), env=ENV, check=True, capture_output=True)

    broken = tmp_path / "broken"
    kill_when_exists(_command(*steps, "--checkpoint.out_dir", str(broken)), broken / "step-8", ENV)
    assert 8 <= max(_records(broken, "loss")) < 24 and not (broken / "final").exists()

    resumed = subprocess.run(_command(*steps, "--checkpoint.out_dir", str(broken), "--resume"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _records(broken, "loss") == _records(whole, "loss")  # dropout's random draws resume too
    assert _records(broken, "val_loss") == _records(whole, "val_loss")


def test_bad_inputs_fail_in_one_line(shared, tmp_path, capsys):
    missing_field = tmp_path / "missing.json"
    missing_field.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    other_base = tmp_path / "other"
    other_adapter = tmp_path / "other-adapter"
    from llamakit import load_model
    from llamakit.checkpoint.peft import save_adapter
    from llamakit.model.lora import LoRAConfig, apply_lora
    from tests.helpers import hf_llama

    hf_llama(vocab_size=512).save_pretrained(other_base)
    model = load_model(other_base)
    apply_lora(model, LoRAConfig())
    save_adapter(other_adapter, model, LoRAConfig())
    capsys.readouterr()  # transformers' progress bars
    run = ["finetune", str(TINY), *COMMON, "--checkpoint.out_dir", str(tmp_path / "run")]
    cases = [
        ([*run, "--data.path", str(missing_field)], "output"),
        ([*run, "--data.path", str(empty)], "empty"),
        ([*run, "--method.lora.targets", "[qkv_proj]"], "qkv_proj"),
        ([*run, "--method.name", "adapterz"], "method.name"),
        ([*run, "--data.seq_len", "4096"], "max_seq_len"),
        (["generate", "--checkpoint", str(BASE), "--tokenizer", str(TOKENIZER), "--adapter", str(other_adapter),
          "Hi"], "different base model"),
        (["generate", "--checkpoint", str(BASE), "--tokenizer", str(TOKENIZER), "--adapter", str(tmp_path), "Hi"],
         "no adapter_config.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("method", ["lora", "prompt"])  # FSDP2 over a frozen base; DDP (prompt tuning)
def test_two_processes_give_the_losses_of_one(shared, tmp_path, method):
    args = ["--method.name", method, "--method.lora.dropout", "0", "--data.max_examples", "200", "--train.max_steps",
            "4", "--eval.every", "2", "--eval.batches", "1", "--checkpoint.every", "0"]  # 4 val examples
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_command(*args, "--checkpoint.out_dir", str(one)), env=ENV, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                *_command(*args, "--checkpoint.out_dir", str(two))[1:]]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("loss", "val_loss"):
        a, b = _records(one, key), _records(two, key)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 * max(1, abs(a[s])) for s in a), (a, b)
    assert (two / "final" / "adapter_model.safetensors").is_file()
