"""A real `llamakit serve` subprocess on a free loopback port, serving stories260K, shared by the serve tests."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from llamakit import load_checkpoint
from llamakit.generate import SamplingParams, generate, prepare_for_decoding, stream
from llamakit.tokenizer.chat import encode_dialog, stop_ids_for
from tests.helpers import free_port

GREEDY = SamplingParams(temperature=0)
API_KEY = "test-key-123"
MODEL = "stories"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: object

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        with open(self.log.name, encoding="utf-8") as f:
            return f.read()


def start_server(assets, log_path, *extra: str, api_key: str | None = API_KEY) -> Server:
    server = launch(assets, log_path, *extra, api_key=api_key)
    wait_ready(server)
    return server


def launch(assets, log_path, *extra: str, api_key: str | None = API_KEY) -> Server:
    """Start the server process; it is not ready yet."""
    port = free_port()
    command = [sys.executable, "-m", "llamakit", "serve", "--checkpoint", str(assets / "tinyllamas" / "stories260K.bin"),
               "--tokenizer", str(assets / "tinyllamas" / "tok512.model"), "--port", str(port),
               "--served-model-name", MODEL, *extra]
    if api_key:
        command += ["--api-key", api_key]
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by stop()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(server: Server, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode}):\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not get ready in {timeout} s:\n{server.log_text()}")


def stop(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    server.log.close()
    return code


def served(assets, tmp_path_factory, name: str, *extra: str, api_key: str | None = API_KEY):
    """A fixture's body: a server started with `extra` options, then stopped cleanly (status 0, no traceback)."""
    server = start_server(assets, tmp_path_factory.mktemp("serve") / f"{name}.log", *extra, api_key=api_key)
    yield server
    assert stop(server) == 0
    assert "Traceback" not in server.log_text()


@pytest.fixture(scope="session")
def server(assets, tmp_path_factory):
    yield from served(assets, tmp_path_factory, "server", "--max-batch-size", "8", "--max-waiting", "64")


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(assets, one_thread):
    """The same model in this process, one thread like the server, for the expected outputs."""
    model, tok = load_checkpoint(assets / "tinyllamas" / "stories260K.bin", assets / "tinyllamas" / "tok512.model")
    return prepare_for_decoding(model), tok


def expected_completion(reference, prompt: str, max_tokens: int, stop=()):
    model, tok = reference
    ids = tok.encode(prompt, bos=True)
    return ids, generate(model, tok, [ids], max_tokens, GREEDY, stop_strings=stop)[0]


def expected_chat(reference, messages, max_tokens: int):
    model, tok = reference
    ids = encode_dialog(tok, messages, "llama2")
    pieces = stream(model, tok, ids, max_tokens, GREEDY, stop_ids=stop_ids_for(tok, "llama2"), follows_prompt=False)
    return ids, "".join(pieces)
