"""Device choice: a device this machine cannot run on is a one-line error in every command, never a traceback.
Processes: a torchrun job's ranks join one group and one data-parallel DeviceMesh."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llamakit.cli import main
from llamakit.errors import LlamakitError
from llamakit.runtime import Processes, close_processes, default_device, device_mesh, init_processes, resolve_device

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


WORKER = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from llamakit.runtime import device_mesh, init_processes

procs = init_processes("cpu")
mesh = device_mesh(procs)
total = torch.tensor([procs.rank + 1.0])
dist.all_reduce(total, group=mesh.get_group("dp"))
seen = f"{procs.world_size} {dist.get_backend()} {mesh.mesh_dim_names} {mesh.size()} {int(total)}"
Path(sys.argv[1], f"rank{procs.rank}.txt").write_text(seen)  # one file each: printed lines could interleave
"""


def test_torchrun_ranks_join_one_gloo_group_and_a_data_parallel_mesh(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(tmp_path / "worker.py"), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for rank in (0, 1):  # each rank's sum over the mesh is 1 + 2
        assert (tmp_path / f"rank{rank}.txt").read_text() == "2 gloo ('pp', 'dp', 'tp') 2 3"


def test_a_single_process_has_a_one_process_mesh(cpu_only, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    procs = init_processes("cpu")
    assert procs == Processes(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")) and procs.is_main
    assert not dist.is_initialized()  # one process needs no group until it asks for the mesh
    try:
        mesh = device_mesh(procs)
        assert mesh.mesh_dim_names == ("pp", "dp", "tp") and mesh.size() == 1 and mesh.get_local_rank("dp") == 0
    finally:
        close_processes()
    assert not dist.is_initialized()


def test_the_ranks_form_a_pp_dp_tp_grid_with_tp_fastest():
    """8 processes as 2 pipeline stages x 2 replicas x 2 tensor-parallel ranks: consecutive ranks split a layer."""
    grid = [Processes(rank, 8, rank, torch.device("cpu")).with_layout(tp=2, pp=2) for rank in range(8)]
    assert [(p.pp_rank, p.dp_rank, p.tp_rank) for p in grid] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert {p.dp for p in grid} == {2}


@pytest.mark.parametrize("tp, pp, problem", [
    (3, 1, "tp=3 x pp=1 does not divide the 4 processes of this job; start torchrun with a multiple of 3"),
    (2, 4, "tp=2 x pp=4 does not divide the 4 processes"),
    (0, 1, "tp=0 must be a positive whole number"),
])
def test_a_layout_that_does_not_fit_the_job_is_refused(tp, pp, problem):
    with pytest.raises(LlamakitError, match=problem):
        Processes(0, 4, 0, torch.device("cpu")).with_layout(tp=tp, pp=pp)
