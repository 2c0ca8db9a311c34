"""Running untrusted Python (model-written HumanEval solutions) in a child process with hard limits.

The child is `python -I` (isolated: no user site, no PYTHON* variables, script directory not on sys.path) in
a fresh temporary directory, with an environment of a minimal PATH only, stdin closed, its own session (so
a timeout kills every process it started) and resource limits set before exec: address space, CPU seconds,
processes (RLIMIT_NPROC; note that root is exempt from it), file size (which also caps what it can print,
since its output goes to files) and no core dumps.

This is containment for honest mistakes and runaway code (infinite loops, memory bombs, huge output), not
a security boundary against a determined attacker: there are no namespaces, seccomp or network isolation.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 10.0
MEMORY_MB = 1024
FILE_MB = 16
TAIL_CHARS = 2000
MINIMAL_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (any other exit, a signal included) or "timeout"
    returncode: int | None  # None when killed on timeout
    stdout_tail: str
    stderr_tail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(timeout_s: float, memory_mb: int, file_mb: int) -> None:
    """preexec_fn: runs in the child between fork and exec; only async-signal-safe-ish work here."""
    cpu = max(1, int(timeout_s) + 1)
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    try:
        # The child itself already exists; any process it tries to start beyond this is refused
        # (for non-root users: the limit counts all of the user's processes).
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 4))
            return fh.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def run_python(source: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
               file_mb: int = FILE_MB, python: str = sys.executable) -> SandboxResult:
    """Run `source` as a script in the sandbox and report how it ended."""
    with tempfile.TemporaryDirectory(prefix="calm-sandbox-") as tmp:
        work = Path(tmp)
        script = work / "program.py"
        script.write_text(source, encoding="utf-8")
        out_path, err_path = work / ".stdout", work / ".stderr"
        started = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [python, "-I", str(script)], cwd=work, env={"PATH": MINIMAL_PATH}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True, close_fds=True,
                preexec_fn=lambda: _limits(timeout_s, memory_mb, file_mb))
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                status, returncode = "timeout", None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever it started, too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - started
        stderr = _tail(err_path)
        if status == "timeout":
            stderr += f"\n[sandbox] killed after {timeout_s:g} s wall-clock"
        elif returncode is not None and returncode < 0:
            stderr += f"\n[sandbox] killed by signal {_signal_name(-returncode)}"
        return SandboxResult(status, returncode, _tail(out_path), stderr.strip(), seconds)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
