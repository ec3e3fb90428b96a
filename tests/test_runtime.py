"""Device choice: a device this machine cannot run on is a one-line error in every command, never a traceback."""

from pathlib import Path

import pytest
import torch

from llamakit.cli import main
from llamakit.errors import LlamakitError
from llamakit.runtime import default_device, resolve_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as one without CUDA (and without Apple's MPS), whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("name, problem", [
    ("cuda", "'cuda': (this PyTorch has no CUDA support|no CUDA device is visible); available here: cpu$"),
    ("cuda:1", "'cuda:1': (this PyTorch has no CUDA support|no CUDA device is visible); available here: cpu$"),
    ("mps", "'mps': MPS .* is not available on this machine; available here: cpu$"),
    ("meta", "'meta': the meta device holds shapes but no values"),
    ("tpu", "'tpu' is not a device name; use cpu, cuda, cuda:N or mps \\(available here: cpu\\)$"),
    ("CUDA", "'CUDA' is not a device name"),
    ("xla", "'xla': llamakit does not run on xla devices"),
])
def test_unusable_devices_are_refused_with_the_choices(cpu_only, name, problem):
    with pytest.raises(LlamakitError, match=f"^--device {problem}"):
        resolve_device(name, "--device")


def test_cuda_devices_are_checked_against_the_count(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")  # the caller picks the index (e.g. LOCAL_RANK)
    with pytest.raises(LlamakitError, match="'cuda:2': this machine has 2 CUDA device.*cpu, cuda:0, cuda:1$"):
        resolve_device("cuda:2")


def test_the_default_is_this_machines_best(cpu_only):
    assert resolve_device(None) == resolve_device("auto") == default_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(assets):
    return ["--checkpoint", str(assets / "tinyllamas" / "stories260K.bin"), "--tokenizer",
            str(assets / "tinyllamas" / "tok512.model")]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("device", ["cuda", "tpu", "mps", "meta"])
def test_generate_chat_and_eval_refuse_in_one_line(cpu_only, tiny, tmp_path, capsys, device):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a cat.\n")
    for argv in (["generate", "Hi", *tiny], ["chat", *tiny], ["eval", *tiny, "--text", str(text)]):
        err = one_line_error(capsys, [*argv, "--device", device])
        assert err.startswith(f"llamakit {argv[0]}: error: --device '{device}'") and "available here: cpu" in err


@pytest.mark.parametrize("command, config", [("pretrain", "configs/pretrain/tiny.yaml"),
                                             ("finetune", "configs/finetune/tiny-lora.yaml")])
def test_pretrain_and_finetune_refuse_in_one_line(cpu_only, tmp_path, capsys, command, config):
    for device in ("cuda", "tpu", "mps", "meta"):
        err = one_line_error(capsys, [command, str(REPO / config), "--train.device", device,
                                      "--checkpoint.out_dir", str(tmp_path / device)])
        assert err.startswith(f"llamakit {command}: error: train.device '{device}'"), err


def test_the_harness_falls_back_to_cpu_for_lm_evals_default_cuda_only(cpu_only, caplog):
    harness = pytest.importorskip("llamakit.eval.harness")
    assert harness._device("cuda") == torch.device("cpu")  # lm_eval's own default, on a machine without CUDA
    assert "CUDA is not available" in caplog.text
    with pytest.raises(LlamakitError, match="device 'tpu' is not a device name"):
        harness._device("tpu")
