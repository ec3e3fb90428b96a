"""llama.cpp as a reference: build `llama-server`, `llama-bench`, `llama-quantize` and `llama-perplexity` once,
and convert checkpoints to GGUF.

    python benchmarks/llama_cpp.py                       # build (or find) the binaries, print their paths
    python benchmarks/llama_cpp.py --gguf CKPT OUT.gguf  # also convert a llamakit/HF checkpoint to GGUF f32

The source is the llama-cpp-python sdist from PyPI, which vendors llama.cpp under vendor/llama.cpp, so a
pinned version needs nothing but pip, cmake and a C++ compiler. Everything lands in
~/.cache/llamakit/llama.cpp-<version>/ ($LLAMAKIT_CACHE overrides ~/.cache/llamakit): src/ (the source tree,
kept for convert_hf_to_gguf.py), build/, and bin/, which only ever holds finished binaries. The converter
imports the gguf-py beside it (the same version as `gguf` on PyPI, a dependency of llamakit's; its own
dependencies come with it), torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python release; its vendor/llama.cpp is what gets built
TARGETS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity")


class BuildError(RuntimeError):
    """A step of fetching, building or converting failed; the message is one line and names the fix."""


def cache_dir(version: str = VERSION) -> Path:
    root = Path(os.environ.get("LLAMAKIT_CACHE", Path.home() / ".cache" / "llamakit"))
    return root / f"llama.cpp-{version}"


def built(version: str = VERSION) -> dict[str, Path]:
    """The finished binaries already in bin/ (some or all of TARGETS), and "convert_hf_to_gguf.py" if the source
    is unpacked; never downloads or builds anything (tests use this, and skip what is missing)."""
    root = cache_dir(version)
    found = {name: root / "bin" / name for name in TARGETS if (root / "bin" / name).is_file()}
    converter = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    return found | ({"convert_hf_to_gguf.py": converter} if converter.is_file() else {})


def binaries(version: str = VERSION, jobs: int = 2) -> dict[str, Path]:
    """Paths of the TARGETS binaries, building them the first time."""
    bin_dir = cache_dir(version) / "bin"
    found = {name: bin_dir / name for name in TARGETS}
    if all(p.is_file() for p in found.values()):
        return found
    build_dir = _configure(source_tree(version), cache_dir(version) / "build")
    _run(["cmake", "--build", str(build_dir), "--target", *TARGETS, f"-j{jobs}"], "building llama.cpp")
    bin_dir.mkdir(exist_ok=True)
    for name, dst in found.items():  # copy under a temporary name, then rename: bin/ never holds half a file
        tmp = dst.with_name(f".{name}.tmp")
        shutil.copy2(build_dir / "bin" / name, tmp)
        tmp.replace(dst)
    return found


def describe(version: str = VERSION) -> str:
    """Which llama.cpp this is, e.g. "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"."""
    out = subprocess.run([str(binaries(version)["llama-server"]), "--version"], capture_output=True, text=True)
    commit = next((ln.split("commit")[-1].strip(" )") for ln in (out.stdout + out.stderr).splitlines()
                   if "commit" in ln), "unknown commit")
    return f"llama.cpp {commit} (llama-cpp-python {version})"


def source_tree(version: str = VERSION) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    root = cache_dir(version)
    tree = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--dest", tmp, f"llama-cpp-python=={version}"], f"downloading llama-cpp-python=={version} from PyPI")
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(Path(tmp) / "src", filter="data")
        shutil.rmtree(root / "src", ignore_errors=True)  # a half-unpacked tree from an interrupted run
        (Path(tmp) / "src").rename(root / "src")
    if not (tree / "CMakeLists.txt").is_file():
        raise BuildError(f"llama-cpp-python {version}'s sdist has no vendor/llama.cpp; pick another version")
    return tree


def _configure(source: Path, build_dir: Path) -> Path:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found; install it (e.g. apt-get install cmake build-essential)")
    _run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",  # no network code: the benchmark only talks to loopback
          "-DLLAMA_USE_PREBUILT_UI=OFF",  # otherwise the build downloads the web UI from Hugging Face
          "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries that can be copied to bin/
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], "configuring llama.cpp with cmake")
    return build_dir


def convert_to_gguf(checkpoint: str | Path, out: str | Path, version: str = VERSION) -> Path:
    """Write `checkpoint` (any format llamakit reads) as a GGUF f32 file with llama.cpp's own converter."""
    out = Path(out)
    if out.is_file():
        return out
    converter = source_tree(version) / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        hf = Path(tmp) / Path(checkpoint).name  # the converter names the model after its folder
        _run([sys.executable, "-m", "llamakit", "convert", str(checkpoint), str(hf), "--to", "hf"],
             "converting the checkpoint to Hugging Face format")
        partial = Path(tmp) / out.name
        _run([sys.executable, str(converter), str(hf), "--outtype", "f32", "--outfile", str(partial)],
             "converting to GGUF (needs the packages of llamakit's 'bench' extra)")
        partial.replace(out)
    return out


def _run(cmd: list[str], what: str) -> None:
    """Run a step quietly; on failure raise its last meaningful output line, not a wall of logs."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        raise BuildError(f"{what} failed: {(errors or lines or ['exit code %d' % done.returncode])[-1]}")


@contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, n_ctx: int):
    """A llama-server on `gguf` (one slot, an f32 KV cache: its default f16 cache rounds what llamakit keeps in
    fp32); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t",
                             str(threads), "-np", "1", "-c", str(n_ctx), "-ctk", "f32", "-ctv", "f32", "--no-webui",
                             "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            try:
                post(url, "/tokenize", {"content": ""})
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not start on {gguf}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(url: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(url + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=VERSION, help=f"llama-cpp-python version to build (default {VERSION})")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument("--gguf", nargs=2, metavar=("CHECKPOINT", "OUT"), help="also convert CHECKPOINT to GGUF f32")
    args = p.parse_args()
    try:
        for name, path in binaries(args.version, args.jobs).items():
            print(f"{name}: {path}")
        if args.gguf:
            print(f"gguf: {convert_to_gguf(*args.gguf, version=args.version)}")
    except BuildError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
