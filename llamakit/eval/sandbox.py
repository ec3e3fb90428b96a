"""Run untrusted generated Python (HumanEval, MBPP) in a separate, limited process and report only its outcome.

Each program runs in a fresh `python -I -B` process (never in the evaluator), in a new session and process
group, in a fresh scratch directory that is deleted afterwards, with an environment holding only TMPDIR (the
scratch directory) and its output discarded. A small launcher, run in that process before the program, applies:

- resource limits (setrlimit; the hook below refuses raising them): address space and data (memory), file
  size, open files, CPU seconds, no core files, and no new processes or threads (RLIMIT_NPROC 0; the kernel
  does not enforce this one for root);
- a Python audit hook (PEP 578; hooks cannot be removed from Python code) that refuses: writing,
  creating, renaming or deleting files outside the scratch directory, changing directory out of it,
  creating processes (os.system, os.exec*, os.fork, os.posix_spawn, subprocess), signalling other
  processes (os.kill, os.killpg), sockets, raising resource limits, and importing ctypes or
  _posixsubprocess (which would reach the C library past the hook). Reading files is allowed. A program
  that catches a refusal and still passes its tests counts as passed; one that fails after a refusal
  is `blocked`.

The network is also cut at the kernel level when `unshare` can create a user and network namespace (the
program then sees only a loopback interface that is down); otherwise only the audit hook refuses sockets.
The evaluator enforces the wall-clock limit itself: on expiry it kills the whole process group (SIGKILL).

The outcome comes back as one JSON line on a pipe, prefixed by a random token the evaluator sent on
stdin, never as a pickled object; a program that exits without the launcher's line is `crashed`.

This protects against accidents of generated code (deleting files, fork or memory bombs, stray network
calls, endless loops). It is not a security boundary against a program written to escape: Python-level
hooks can be defeated by a determined adversary (e.g. through a native extension already installed);
run evaluations of untrusted models in a disposable container or VM as well.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PASSED, FAILED, ERROR, TIMEOUT, MEMORY, BLOCKED, CRASHED = (
    "passed", "failed", "error", "timeout", "memory", "blocked", "crashed")
# passed: ran to the end; failed: an AssertionError (a test failed); error: any other exception (SyntaxError,
# NameError, SystemExit, ...); timeout: the wall-clock or CPU limit; memory: a MemoryError under the address-space
# limit; blocked: ended in an exception after the sandbox refused something; crashed: died without the launcher's
# report (a signal, os._exit)
OUTCOMES = (PASSED, FAILED, ERROR, TIMEOUT, MEMORY, BLOCKED, CRASHED)
PROGRAM_FILE = "program.py"


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout: float = 3.0  # wall-clock seconds for the whole process (human-eval's default)
    memory_mb: int = 1024  # address space (RLIMIT_AS) and data segment
    file_size_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class Execution:
    """How one program ended: one of OUTCOMES, a short detail (the exception or signal), seconds taken."""

    outcome: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    def to_dict(self) -> dict:
        return asdict(self)


# The launcher runs inside the child before the program; it imports only the standard library. argv: the
# result pipe's fd, the limits as JSON. stdin: the token, then EOF.
_LAUNCHER = r'''
import builtins, json, os, resource, sys

EVENTS_ALWAYS = {"os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
                 "signal.pthread_kill", "subprocess.Popen", "resource.setrlimit", "resource.prlimit", "os.chroot",
                 "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                 "socket.gethostbyname", "socket.gethostbyaddr", "ctypes.dlopen", "ctypes.dlsym"}
IMPORTS_REFUSED = {"ctypes", "_ctypes", "_posixsubprocess"}
# event -> (index of a path argument, index of the dir_fd it is relative to, or None), for each path argument
PATH_ARGS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
             "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
             "os.symlink": ((0, None), (1, 2)), "os.truncate": ((0, None),), "os.chdir": ((0, None),),
             "os.chflags": ((0, None),), "os.lchflags": ((0, None),), "os.setxattr": ((0, None),),
             "os.removexattr": ((0, None),), "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),),
             "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),),
             "sqlite3.connect": ((0, None),)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Refused(PermissionError):
    pass


def resolve(path, dir_fd=None):
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    return os.path.realpath(os.path.join(base, os.fsdecode(path)))


def guard(scratch, refused):
    busy = []

    def inside(path, dir_fd=None):
        if path == ":memory:" or path in (0, 1, 2):
            return True
        real = resolve(path, dir_fd)
        return real == scratch or real.startswith(scratch + os.sep) or real == os.devnull

    def check(event, args):
        if event in EVENTS_ALWAYS or (event == "import" and args[0] in IMPORTS_REFUSED):
            return f"{event} {args[0] if event == 'import' else ''}".strip()
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if inside(path):
                return None
            if writes:
                return f"writing {path!r}"
            # a directory opened with os.open could anchor writes through dir_fd: only the scratch's
            return f"opening the directory {path!r}" if mode is None and os.path.isdir(resolve(path)) else None
        for path_at, dir_fd_at in PATH_ARGS.get(event, ()):
            dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
            if path_at < len(args) and args[path_at] is not None and not inside(args[path_at], dir_fd):
                return f"{event} {args[path_at]!r}"
        return None

    def hook(event, args):
        if busy:  # events raised while checking (none expected) pass
            return
        busy.append(1)
        try:
            reason = check(event, args)
        finally:
            busy.pop()
        if reason:
            refused.append(reason)
            raise Refused(f"the sandbox refused {reason}")
    return hook


def set_limits(limits):
    for name, value in (("RLIMIT_AS", limits["memory"]), ("RLIMIT_DATA", limits["memory"]),
                        ("RLIMIT_FSIZE", limits["file_size"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_CPU", limits["cpu"]), ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0)):
        which = getattr(resource, name)
        allowed = resource.getrlimit(which)[1]  # a limit may only go down
        cap = (lambda v: v) if allowed == resource.RLIM_INFINITY else (lambda v: min(v, allowed))
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL a second later
        resource.setrlimit(which, (cap(value), cap(hard)))


def outcome_of(error, refused):
    if error is None:
        return "passed", ""
    try:
        detail = f"{type(error).__name__}: {error}"[:300]
    except Exception:  # an exception whose str() fails
        detail = type(error).__name__
    if refused:
        return "blocked", f"{refused[0]} ({detail})"[:300]
    if isinstance(error, MemoryError):
        return "memory", detail
    return ("failed" if isinstance(error, AssertionError) else "error"), detail


def main():
    fd, limits = int(sys.argv[1]), json.loads(sys.argv[2])
    token = sys.stdin.readline().strip()
    with open(limits["program"], encoding="utf-8") as f:
        source = f.read()
    del sys.argv[1:]
    scratch, refused, error = os.path.realpath(os.getcwd()), [], None
    write, dumps, leave = os.write, json.dumps, os._exit  # the program may rebind the modules' names
    set_limits(limits)
    sys.addaudithook(guard(scratch, refused))
    try:
        exec(compile(source, limits["program"], "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as e:
        error = e
    outcome, detail = outcome_of(error, refused)
    write(fd, (token + " " + dumps({"outcome": outcome, "detail": detail}) + "\n").encode())
    leave(0)


main()
'''


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs a program in new user and network namespaces, or () where the kernel,
    a container's seccomp profile or a missing `unshare` does not allow it (then only the audit hook
    refuses sockets)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--user", "--net", "--")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], env={}, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if probe.returncode != 0:
        log.info("no network namespace (%s); sockets are refused by the audit hook only",
                 probe.stderr.decode(errors="replace").strip())
        return ()
    return prefix


def describe() -> dict:
    """What the sandbox applies on this machine, for the results file."""
    network = ("a new network namespace (no interfaces up) and the audit hook refusing sockets"
               if network_isolation() else "the audit hook refusing sockets (no network namespace available)")
    return {"process": "a fresh `python -I -B` per program, own session and process group, killed as a group",
            "network": network, "files": "writes outside a fresh scratch directory refused; the directory is deleted",
            "processes": "os.system/exec/fork/spawn, subprocess, ctypes and signals to other processes refused"}


def _limits_json(limits: Limits) -> str:
    mb = 1 << 20
    return json.dumps({"memory": limits.memory_mb * mb, "file_size": limits.file_size_mb * mb,
                       "open_files": limits.open_files, "cpu": math.ceil(limits.timeout) + 1,
                       "program": PROGRAM_FILE})


def execute(argv: Sequence[str], cwd: Path, stdin: bytes, timeout: float, pass_fds: Sequence[int] = (),
            env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run argv in its own session with only the environment `env` and no output; kill its whole process group
    at the deadline. (return code, or None when killed for time; seconds taken)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env or {}, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=tuple(pass_fds), start_new_session=True)
    try:
        proc.communicate(stdin, timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _kill_group(proc)
    return code, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL everything left in the program's process group (it led the group), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_program(source: str, limits: Limits = Limits(), scratch_root: str | Path | None = None) -> Execution:
    """Run one program in the sandbox; its outcome."""
    scratch = Path(tempfile.mkdtemp(prefix="llamakit-sandbox-", dir=scratch_root))
    read_end, write_end = os.pipe()
    try:
        (scratch / PROGRAM_FILE).write_text(source, encoding="utf-8")
        token = secrets.token_hex(16)
        argv = [*network_isolation(), sys.executable, "-I", "-B", "-c", _LAUNCHER, str(write_end), _limits_json(limits)]
        code, seconds = execute(argv, scratch, (token + "\n").encode(), limits.timeout, pass_fds=(write_end,),
                                env={"TMPDIR": str(scratch)})  # nothing else: tempfile then stays inside
        os.close(write_end)
        write_end = -1
        return _outcome(code, _report(read_end, token), seconds, limits)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        _remove(scratch)


def _report(read_end: int, token: str) -> dict | None:
    """The launcher's result line, if it wrote one carrying the token."""
    os.set_blocking(read_end, False)
    try:
        data = os.read(read_end, 1 << 16).decode(errors="replace")
    except BlockingIOError:
        return None
    first, _, rest = data.partition(" ")
    if first != token:
        return None
    try:
        report = json.loads(rest.splitlines()[0])
    except (json.JSONDecodeError, IndexError):
        return None
    return report if isinstance(report, dict) and report.get("outcome") in OUTCOMES else None


def _outcome(code: int | None, report: dict | None, seconds: float, limits: Limits) -> Execution:
    if code is None:
        return Execution(TIMEOUT, f"killed after {limits.timeout:g} s", seconds)
    if report is not None:
        return Execution(report["outcome"], str(report.get("detail", "")), seconds)
    if code == -signal.SIGXCPU:  # the CPU-time limit
        return Execution(TIMEOUT, "CPU time limit (SIGXCPU)", seconds)
    if code < 0:
        return Execution(CRASHED, f"killed by {signal.Signals(-code).name}", seconds)
    return Execution(CRASHED, f"exited with status {code} before finishing", seconds)


def _remove(scratch: Path) -> None:
    """Delete the scratch directory, even where the program took away its own permissions."""
    def retry(func, path, _exc):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)

    shutil.rmtree(scratch, onerror=retry)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = False, desc: str = "executing") -> list[Execution]:
    """Run each program in its own sandbox, `workers` at a time (default: the CPU count); outcomes in order."""
    workers = workers or os.cpu_count() or 1
    network_isolation()  # probe once, before the threads
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda source: run_program(source, limits), sources)
        return list(tqdm(jobs, total=len(sources), desc=desc, disable=not progress, leave=False))
