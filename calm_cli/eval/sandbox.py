"""Running untrusted Python (model-written HumanEval solutions) contained; docs/SANDBOX.md says what and how.

Every sandboxed process is `python -I -S calm_cli/eval/sandbox_child.py CONFIG`, a trusted first step that
confines itself before anything untrusted runs. The containment level is detected once per calm process:

- "namespaces" (calm runs as root): util-linux `unshare` gives the process new network, mount, PID, IPC and
  UTS namespaces; every mount is made read-only, calm's directories and the home directory are covered by
  an empty tmpfs, and a size-capped tmpfs on /tmp is the only writable place; the process then switches to
  an unused uid/gid (no supplementary groups, no capabilities), sets no-new-privs and a seccomp filter that
  refuses new namespaces;
- "user-namespaces" (not root, unprivileged user namespaces allowed): the same inside a user namespace,
  whose root keeps no capabilities;
- "audit-hooks" (neither): a weaker fallback: Python audit hooks refuse sockets, new processes, signals,
  ctypes, reads of calm's files and writes outside a private temporary directory; a RuntimeWarning says so.

Always: rlimits (address space, CPU seconds, file size, open files, processes), a minimal environment,
input through stdin only, output to files calm reads the tail of, a wall-clock timeout after which the
whole thing is killed (the PID namespace's init, which takes every process inside with it; in the fallback,
the process group).

A HumanEval check (`run_check`) uses two such processes: a worker that loads the candidate and answers
calls to its entry point over pipes, as data (tagged JSON), and a checker that runs the trusted test's
`check(candidate)` against a proxy. The verdict comes from the checker on a pipe the worker never holds, so
nothing the candidate does (printing, exiting 0, reading files) can fake a pass.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from calm_cli import settings
from calm_cli.bounded import one_line

TIMEOUT_S = 10.0
MEMORY_MB = 1024
FILE_MB = 16  # per file, and so what a process can print (its output goes to files)
DISK_MB = 64  # the private tmpfs: the total a sandboxed process can write
INODES = 4096  # files and directories on that tmpfs
FALLBACK_FILES = 16  # audit-hooks level: files it may create (so at most FALLBACK_FILES x FILE_MB on disk)
NPROC = 16  # processes (threads included) the unused uid may have; all die with the PID namespace
TAIL_CHARS = 2000
MINIMAL_PATH = "/usr/bin:/bin"
LEVELS = ("namespaces", "user-namespaces", "audit-hooks")
CHILD = Path(__file__).with_name("sandbox_child.py")
# Unused uids/gids: a fresh one per process, no passwd entry needed (well above any distribution's ranges
# and below 2**31, which some tools treat as negative).
UID_BASE, UID_SPAN = 2_000_000_000, 140_000_000
_PID_WAIT_S = 10.0  # how long a child may take to say its pid before it is killed by process group only
# util-linux 2.38 unshare, when its child dies of SIGKILL, fails to re-raise it (sigprocmask refuses SIGKILL)
# and says this on the stderr it shares with the child, then exits 1: the child was killed (by calm, or by
# RLIMIT_CPU's hard limit); calm reports that instead of the line.
_UNSHARE_KILLED = "unshare: sigprocmask unblock failed: Invalid argument"


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (any other exit, a signal included) or "timeout"
    returncode: int | None  # None when killed on timeout
    stdout_tail: str
    stderr_tail: str
    seconds: float
    level: str = ""  # the containment level it ran under (LEVELS)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class CheckResult:
    status: str  # "passed" (check returned), "failed" or "timeout"
    reason: str  # why it failed: the exception, the test line, the last call; "" when passed
    output_tail: str  # what the candidate printed (stdout and stderr, interleaved)
    calls: int  # calls to the candidate the checker made (0 when unknown)
    seconds: float
    level: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------------------------------------
# Levels


_detected: tuple[str, str] | None = None
_detect_lock = threading.Lock()
_uids: set[int] = set()
_uid_lock = threading.Lock()


def current_level() -> str:
    """The containment level of this calm process, detected once (a probe per level, strongest first)."""
    return _level_and_why()[0]


def level_reason() -> str:
    """Why the stronger levels were not available ("" when the strongest one is)."""
    return _level_and_why()[1]


def _level_and_why() -> tuple[str, str]:
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _detect()
            if _detected[0] == "audit-hooks":
                warnings.warn(f"calm sandbox: no namespaces ({_detected[1]}); model-written code runs under "
                              "Python audit hooks only, a weaker containment (docs/SANDBOX.md)", RuntimeWarning,
                              stacklevel=3)
        return _detected


def _detect() -> tuple[str, str]:
    why = []
    for candidate in (["namespaces"] if os.geteuid() == 0 else []) + ["user-namespaces"]:
        problem = probe(candidate)
        if problem is None:
            return candidate, "; ".join(why)
        why.append(f"{candidate}: {problem}")
    return "audit-hooks", "; ".join(why)


def probe(candidate: str, python: str = sys.executable) -> str | None:
    """None if `candidate` (a namespace level) works here, else why not: a child confined at that level
    must report no capabilities, no network and no write outside its tmpfs."""
    if shutil.which("unshare", path=MINIMAL_PATH) is None:
        return "util-linux unshare not found"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # a port that is open on the host: the probe must not reach it
        outside = Path("/") / f"calm-sandbox-probe-{secrets.token_hex(6)}"
        child = _spawn(candidate, "probe", {"port": listener.getsockname()[1], "outside": str(outside)}, b"", out,
                       err, python, Limits(timeout_s=10.0))
        try:
            returncode = _wait(child.proc, 10.0)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            child.stop()
        if outside.exists():
            outside.unlink()
            return "the probe could write outside its tmpfs"
        if returncode != 0:
            last = _tail(err)[0].strip().splitlines()[-1:] or [f"exit {returncode}"]  # the error, not the traceback
            return one_line(f"the probe failed ({last[0]})", 300)
        try:
            report = json.loads(_tail(out)[0])
        except ValueError:
            return "the probe's report did not parse"
    wanted = {"cap_eff": "0000000000000000", "no_new_privs": "1", "inside_write": "written"}
    wrong = [f"{key}={report.get(key)!r}" for key, value in wanted.items() if report.get(key) != value]
    if not str(report.get("network", "")).startswith("refused"):
        wrong.append("the network was reachable")
    if not str(report.get("outside_write", "")).startswith("refused"):
        wrong.append("it could write outside its tmpfs")
    return f"the probe found {', '.join(wrong)}" if wrong else None


# ----------------------------------------------------------------------------------------------------------
# One sandboxed process


@dataclass(frozen=True)
class Limits:
    """Per sandboxed process: wall-clock (and so CPU seconds), address space, one file, the tmpfs."""

    timeout_s: float = TIMEOUT_S
    memory_mb: int = MEMORY_MB
    file_mb: int = FILE_MB
    disk_mb: int = DISK_MB


# Hidden directories must not contain these: covering them would take the system away from the sandbox.
_SYSTEM = ("/usr", "/bin", "/lib", "/etc", "/tmp", "/proc", "/dev", "/sys", "/var")


def hidden_directories() -> list[str]:
    """What the sandbox must not even read: calm's directories (the cache holds the HumanEval tests, whose
    expected values a candidate could otherwise look up) and the user's home."""
    paths = [Path.home()]
    for name in settings.DIRECTORIES:
        try:
            paths.append(settings.path(name))
        except settings.SettingError:
            continue  # calm refuses to start with it anyway
    out: list[str] = []
    for resolved in (str(p.resolve()) for p in paths if p.is_absolute()):
        if resolved != "/" and not any(s == resolved or s.startswith(resolved + "/") for s in _SYSTEM):
            out.append(resolved)
    return sorted(set(out))


def _fresh_uid() -> int:
    with _uid_lock:
        while True:
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in _uids:
                _uids.add(uid)
                return uid


class _Child:
    """A sandboxed process: the launcher calm started (unshare, or python itself in the fallback) and,
    with namespaces, a pidfd on the namespace's init (killing it kills everything inside)."""

    def __init__(self, proc: subprocess.Popen, pid_pipe: int | None, uid: int, workdir: str | None) -> None:
        self.proc, self.pid_pipe, self.uid, self.workdir = proc, pid_pipe, uid, workdir
        self.pidfd: int | None = None

    def attach(self, deadline: float) -> None:
        """Open a pidfd on the namespace's init from the pid it reported (before it ran anything untrusted).
        The pid is trusted only while its parent is still our launcher: pids are reused."""
        if self.pid_pipe is None:
            return
        poll = select.poll()  # not select(): a busy calm may hold descriptors above FD_SETSIZE
        poll.register(self.pid_pipe, select.POLLIN)
        ready = poll.poll(max(0.0, min(deadline - time.monotonic(), _PID_WAIT_S)) * 1000)
        data = os.read(self.pid_pipe, 8) if ready else b""
        os.close(self.pid_pipe)
        self.pid_pipe = None
        if len(data) != 8:
            return
        (pid,) = struct.unpack(">Q", data)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        if _parent(pid) == self.proc.pid:
            self.pidfd = pidfd
        else:
            os.close(pidfd)

    def stop(self) -> None:
        """Kill everything this child started and wait until it is gone."""
        if self.pid_pipe is not None:
            self.attach(time.monotonic() + _PID_WAIT_S)
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # The launcher reaps the init only once the kernel has killed and reaped everything in its PID
            # namespace: when it exits, nothing of the sandbox is left.
            try:
                _wait(self.proc, 30.0)
            except subprocess.TimeoutExpired:
                pass
            os.close(self.pidfd)
            self.pidfd = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher, and the process group in the fallback
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _uid_lock:
            _uids.discard(self.uid)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout), woken by a pidfd the moment the process exits: Popen.wait with a timeout polls
    with sleeps of up to 50 ms, which was most of a check's overhead."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped, or a kernel without pidfds
        return proc.wait(timeout=timeout)
    try:
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        if not poll.poll(max(0.0, timeout) * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _spawn(lvl: str, role: str, extra: dict, stdin: bytes, stdout: IO | int, stderr: IO | int, python: str,
           limits: Limits, pass_fds: tuple[int, ...] = ()) -> _Child:
    """Start the child for `role` at level `lvl`, its input written to its stdin."""
    if lvl not in LEVELS:
        raise ValueError(f"sandbox level must be one of {', '.join(LEVELS)}, got {lvl!r}")
    uid = _fresh_uid()
    workdir = None
    config = {"role": role, "level": lvl, "uid": uid, "memory_mb": limits.memory_mb,
              "cpu_s": max(1, int(limits.timeout_s) + 1), "file_mb": limits.file_mb, "disk_mb": limits.disk_mb,
              "inodes": INODES, "nproc": NPROC if lvl == "namespaces" else 0, "max_files": FALLBACK_FILES,
              "hidden": hidden_directories(), **extra}
    command = [python, "-I", "-S", str(CHILD)]
    pid_read = pid_write = None
    if lvl == "audit-hooks":
        workdir = tempfile.mkdtemp(prefix="calm-sandbox-")  # the child gives it to the uid it switches to
        config["workdir"] = workdir
    else:
        pid_read, pid_write = os.pipe()
        config["pid_fd"] = pid_write
        user = ["--user", "--map-root-user"] if lvl == "user-namespaces" else []
        command = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", *user,
                   "--", *command]
    fds = pass_fds + ((pid_write,) if pid_write is not None else ())
    try:
        proc = subprocess.Popen([*command, json.dumps(config)], stdin=subprocess.PIPE, stdout=stdout,
                                stderr=stderr, pass_fds=fds, start_new_session=True, close_fds=True,
                                env={"PATH": MINIMAL_PATH})
    except BaseException:
        if pid_read is not None:
            os.close(pid_read)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        with _uid_lock:
            _uids.discard(uid)
        raise
    finally:
        if pid_write is not None:
            os.close(pid_write)
    child = _Child(proc, pid_read, uid, workdir)
    try:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died before reading; its exit status and stderr say why
    return child


def _tail(fh: IO[bytes], chars: int = TAIL_CHARS) -> tuple[str, bool]:
    """(the last `chars` characters written, whether the launcher said its child was killed)."""
    fh.flush()
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - chars * 4 - len(_UNSHARE_KILLED)))
    text = fh.read().decode("utf-8", errors="replace")
    killed = text.rstrip().endswith(_UNSHARE_KILLED)
    if killed:
        text = text.rstrip()[: -len(_UNSHARE_KILLED)]
    return text[-chars:], killed


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ----------------------------------------------------------------------------------------------------------
# Entry points


def run_python(source: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB, file_mb: int = FILE_MB,
               python: str = sys.executable, disk_mb: int = DISK_MB, level: str | None = None) -> SandboxResult:
    """Run `source` as a script in the sandbox and report how it ended. `level` forces a containment level
    (tests do, to check the fallback); by default the detected one."""
    lvl = level or current_level()
    limits = Limits(timeout_s, memory_mb, file_mb, disk_mb)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = _spawn(lvl, "script", {}, source.encode("utf-8", errors="surrogatepass"), out, err, python, limits)
        try:
            child.attach(deadline)
            returncode: int | None = _wait(child.proc, deadline - time.monotonic())
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, returncode = "timeout", None
        finally:
            child.stop()
        seconds = time.perf_counter() - started
        stderr, killed = _tail(err)
        if status == "timeout":
            stderr += f"\n[sandbox] killed after {timeout_s:g} s wall-clock"
        elif returncode is not None and returncode < 0:
            stderr += f"\n[sandbox] killed by signal {_signal_name(-returncode)}"
        elif killed:
            stderr += "\n[sandbox] killed by signal SIGKILL"
        return SandboxResult(status, returncode, _tail(out)[0], stderr.strip(), seconds, lvl)


def run_check(candidate: str, entry_point: str, test: str, context: str = "", timeout_s: float = TIMEOUT_S,
              memory_mb: int = MEMORY_MB, python: str = sys.executable, level: str | None = None) -> CheckResult:
    """Check a candidate module (`candidate`, defining `entry_point`) with a test that defines
    check(candidate), as HumanEval does. `context` runs before the test in the checker (HumanEval's prompt:
    tests use its helpers, such as poly or encode_cyclic). Passed means check() returned.

    One sandbox, two processes: its first process forks the worker (reads the candidate on stdin) and then
    the checker (reads the test on its own pipe, writes the verdict on another), each confined on its own;
    one Python start instead of two, which is most of a check's cost."""
    lvl = level or current_level()
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    task = json.dumps({"context": context, "test": test, "entry_point": entry_point}).encode()
    task_r, task_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    checker_uid = _fresh_uid()
    timed_out = False
    try:
        with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as checker_err:
            extra = {"entry_point": entry_point, "checker_uid": checker_uid, "task_fd": task_r,
                     "verdict_fd": verdict_w, "checker_err_fd": checker_err.fileno()}
            try:
                child = _spawn(lvl, "pair", extra, candidate.encode("utf-8", errors="surrogatepass"), output,
                               output, python, Limits(timeout_s, memory_mb),
                               (task_r, verdict_w, checker_err.fileno()))
            finally:
                for fd in (task_r, verdict_w):
                    os.close(fd)  # only the sandbox holds these now: a pipe ends when its side exits
            try:
                with open(task_w, "wb", closefd=False) as fh:
                    fh.write(task)
            except BrokenPipeError:
                pass  # the sandbox ended before reading it: no verdict says so
            finally:
                os.close(task_w)
                task_w = -1
            try:
                child.attach(deadline)
                _wait(child.proc, deadline - time.monotonic())
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                child.stop()
            verdict = _read_verdict(verdict_r)
            tail, _ = _tail(output)
            checker_tail = _tail(checker_err)[0].strip()
    finally:
        os.close(verdict_r)
        if task_w >= 0:
            os.close(task_w)
        with _uid_lock:
            _uids.discard(checker_uid)
    seconds = time.perf_counter() - started
    tail = tail.strip()
    if timed_out:
        return CheckResult("timeout", f"killed after {timeout_s:g} s wall-clock", tail, 0, seconds, lvl)
    if verdict is None:
        code = child.proc.returncode
        last = checker_tail.splitlines()[-1:] or [f"signal {_signal_name(-code)}" if code < 0 else f"exit {code}"]
        return CheckResult("failed", f"the checker ended without a verdict: {last[0]}", tail, 0, seconds, lvl)
    calls = verdict.get("calls")
    calls = calls if isinstance(calls, int) else 0
    if verdict.get("passed") is True:
        return CheckResult("passed", "", tail, calls, seconds, lvl)
    return CheckResult("failed", str(verdict.get("reason", "no reason given")), tail, calls, seconds, lvl)


def _read_verdict(fd: int) -> dict | None:
    """The checker's verdict, once every process of the checker is gone (the pipe then holds all it wrote).
    The checker is trusted, but a damaged or cut message still reads as no verdict."""
    data = b""
    while len(data) <= 1 << 20 and (chunk := os.read(fd, 65536)):
        data += chunk
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != len(data) - 4:
        return None
    try:
        verdict = json.loads(data[4:])
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) else None
