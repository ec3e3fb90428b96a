"""The sandbox: each outcome reported distinctly; time, memory, network, file-system and process limits hold."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from llamakit.eval import sandbox
from llamakit.eval.sandbox import (
    BLOCKED,
    CRASHED,
    ERROR,
    FAILED,
    MEMORY,
    OUTCOMES,
    PASSED,
    TIMEOUT,
    Limits,
    execute,
    network_isolation,
    run_program,
    run_programs,
)

ROOMY = Limits(timeout=30, memory_mb=256)  # time enough on a loaded machine: only the timeout cases use SHORT
SHORT = Limits(timeout=1.5, memory_mb=256)


def run(source: str, limits: Limits = ROOMY, **kwargs):
    return run_program(textwrap.dedent(source), limits, **kwargs)


def test_correct_solution_passes_and_wrong_one_fails():
    assert run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n").outcome == PASSED
    wrong = run("def add(a, b):\n    return a * b\nassert add(2, 3) == 5, 'add is wrong'\n")
    assert wrong.outcome == FAILED and wrong.detail == "AssertionError: add is wrong"


@pytest.mark.parametrize("source, outcome, detail", [
    ("undefined_name\n", ERROR, "NameError"),
    ("def f(:\n", ERROR, "SyntaxError"),
    ("import sys\nsys.exit(0)\n", ERROR, "SystemExit"),  # the tests never ran to the end: not a pass
    ("import os, json\nos.write = json.dumps = None\nclass Odd(Exception):\n    def __str__(self):\n        raise ValueError\n"
     "raise Odd()\n", ERROR, "Odd"),  # still reported when the program breaks what the report uses
    ("while True:\n    pass\n", TIMEOUT, "killed after 1.5 s"),  # SHORT's limit
    ("import time\ntime.sleep(60)\n", TIMEOUT, "killed after 1.5 s"),
    ("x = bytearray(1 << 40)\n", MEMORY, "MemoryError"),
    ("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n", MEMORY, "MemoryError"),  # grows to the 256 MB limit
    ("import os\nos._exit(0)\n", CRASHED, "exited with status 0 before finishing"),
    ("import faulthandler\nfaulthandler._sigsegv()\n", CRASHED, "killed by SIGSEGV"),
    ("import os\nos.system('true')\n", BLOCKED, "os.system"),
])
def test_each_outcome_is_reported_distinctly(source, outcome, detail):
    result = run(source, SHORT if outcome == TIMEOUT else ROOMY)
    assert result.outcome == outcome and detail in result.detail, result


def test_outcome_names_are_distinct():
    assert len(set(OUTCOMES)) == len(OUTCOMES) == 7


def test_timeout_kills_the_whole_process_group(tmp_path):
    """A background child of the program dies with it at the deadline (here a shell, not the launcher: the
    launcher itself refuses to start processes)."""
    start = time.monotonic()
    code, seconds = execute(["sh", "-c", "sleep 60 & echo $! > pid; sleep 60"], tmp_path, b"", timeout=1.0)
    assert code is None and 1.0 <= seconds < 5 and time.monotonic() - start < 5
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):  # a killed orphan may stay a zombie for a moment until its new parent reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            alive = False
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def test_memory_limit_is_the_given_one():
    grow = "x = bytearray({} << 20)\n"
    assert run(grow.format(64), Limits(timeout=5, memory_mb=256)).outcome == PASSED
    assert run(grow.format(512), Limits(timeout=5, memory_mb=256)).outcome == MEMORY
    assert run(grow.format(512), Limits(timeout=5, memory_mb=1024)).outcome == PASSED


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1; yields (port, a function telling whether anything connected)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)

    def connected() -> bool:
        try:
            server.accept()[0].close()
            return True
        except TimeoutError:
            return False

    yield server.getsockname()[1], connected
    server.close()


def test_network_is_refused(listener):
    port, connected = listener
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    assert result.outcome == BLOCKED and "socket" in result.detail
    assert not connected()
    # the listener does work: a connection from this process arrives
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert connected()


def test_network_is_refused_without_a_namespace(listener, monkeypatch):
    """Where `unshare` is unavailable the audit hook alone refuses sockets."""
    port, connected = listener
    monkeypatch.setattr(sandbox, "network_isolation", lambda: ())
    result = run(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
    assert result.outcome == BLOCKED and "socket.__new__" in result.detail
    assert not connected()


def test_network_namespace_alone_cuts_the_network(listener):
    """Without any Python-level guard, a program in the namespace cannot reach the host's loopback."""
    prefix = network_isolation()
    if not prefix:
        pytest.skip("this machine cannot create user and network namespaces (unshare)")
    port, connected = listener
    probe = f"import socket\ns = socket.socket()\nprint(s.connect_ex(('127.0.0.1', {port})))"
    out = subprocess.run([*prefix, sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and int(out.stdout) != 0, out
    assert not connected()


@pytest.mark.parametrize("action", [
    "open({target!r}, 'w').write('escaped')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import os\nos.chdir({parent!r})\nopen('escaped.txt', 'w').write('escaped')",
    "import os\nfd = os.open({parent!r}, os.O_RDONLY)\nos.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "import os\nos.symlink({parent!r}, 'link')\nopen('link/escaped.txt', 'w').write('escaped')",
    "import os\nos.system('touch {target}')",
    "import subprocess\nsubprocess.run(['touch', {target!r}])",
    "import ctypes\nctypes.CDLL(None).system(b'touch {target}')",
])
def test_no_writes_outside_the_scratch_directory(tmp_path, action):
    target = tmp_path / "escaped.txt"
    result = run(action.format(target=str(target), parent=str(tmp_path)))
    assert result.outcome == BLOCKED, result
    assert not target.exists()


@pytest.mark.parametrize("action", [
    "import shutil\nshutil.rmtree({keep!r})",
    "import os\nos.remove({file!r})",
    "import os\nos.rename({file!r}, 'stolen.txt')",
    "import os\nos.chmod({file!r}, 0)",
    "import os, signal\nos.kill({pid}, signal.SIGTERM)",
])
def test_destructive_calls_are_refused(tmp_path, action):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file.txt").write_text("precious")
    result = run(action.format(keep=str(keep), file=str(keep / "file.txt"), pid=os.getpid()))
    assert result.outcome == BLOCKED, result
    assert (keep / "file.txt").read_text() == "precious" and os.access(keep / "file.txt", os.R_OK)


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import posix\nwhile True:\n    posix.fork()\n",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()\n",
    "import os\nwhile True:\n    os.posix_spawn('/bin/true', ['true'], {})\n",
])
def test_fork_bomb_is_contained(bomb):
    result = run(bomb)
    assert result.outcome == BLOCKED, result


def test_scratch_directory_is_fresh_and_deleted(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    source = """
        import os
        assert sorted(os.listdir('.')) == ['program.py'] and os.path.basename(os.getcwd()).startswith('llamakit-sandbox-')
        os.makedirs('a/b')
        open('a/b/data.txt', 'w').write('written inside')
        os.chmod('a/b', 0)
        os.chmod('a', 0)
    """
    assert run(source, scratch_root=root).outcome == PASSED
    assert list(root.iterdir()) == []


def test_environment_is_cleared(monkeypatch):
    """Only TMPDIR (the scratch directory) is set; Python may add LC_CTYPE itself (PEP 538)."""
    monkeypatch.setenv("LLAMAKIT_SECRET_TOKEN", "hunter2")
    source = """
        import os, tempfile
        assert set(os.environ) <= {'TMPDIR', 'LC_CTYPE'}, sorted(os.environ)
        assert os.environ['TMPDIR'] == os.getcwd()
        with tempfile.NamedTemporaryFile('w') as f:
            f.write('temporary files stay in the scratch directory')
        with open(os.devnull, 'w') as f:
            f.write('so does /dev/null')
    """
    result = run(source)
    assert result.outcome == PASSED, result


def test_output_file_size_is_limited():
    result = run("open('big.bin', 'wb').write(b'x' * (64 << 20))\n", Limits(timeout=5, file_size_mb=16))
    assert result.outcome == ERROR and "File too large" in result.detail


def test_a_forged_result_does_not_pass():
    forge = """
        import os
        for fd in range(3, 256):
            try:
                os.write(fd, b'0000 {"outcome": "passed", "detail": ""}\\n')
            except OSError:
                pass
        os._exit(0)
    """
    assert run(forge).outcome == CRASHED


def test_programs_run_in_parallel_and_keep_their_order():
    sources = ["assert True\n", "assert False\n", "import time\ntime.sleep(2)\n", "x = y\n"] * 2
    start = time.monotonic()
    results = run_programs(sources, Limits(timeout=30), workers=4)
    assert [r.outcome for r in results] == [PASSED, FAILED, PASSED, ERROR] * 2
    assert time.monotonic() - start < 2 * 2  # the two sleeps overlap
