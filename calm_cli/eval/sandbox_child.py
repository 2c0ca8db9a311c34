"""The trusted first step inside calm's sandbox, then the role it was started for (see docs/SANDBOX.md).

Started by calm_cli.eval.sandbox as `python -I -S sandbox_child.py CONFIG`, through util-linux `unshare` where
namespaces are available. As the namespace's root it prepares the file system (`prepare`); each process
then confines itself (`become`: privileges, rlimits, seccomp, or audit hooks in the fallback) before
anything untrusted runs. Roles:

- "script": a Python script read from stdin (`run_python`);
- "pair": a HumanEval check (`run_check`). This process forks the worker, which loads the candidate module
  (prompt + model-written solution) from stdin and answers calls to the entry point arriving on a pipe,
  as tagged JSON, and never sees the test; then the checker, which reads the trusted test on its own pipe,
  runs `check(candidate)` with a proxy that calls the worker, and writes the verdict on a pipe the worker
  never holds;
- "probe": confine and report what the confinement achieved (level detection).

This file is run as a script in isolated mode, so it imports nothing from calm: it is self-contained.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import reprlib
import resource
import signal
import struct
import sys
import types
from typing import Callable

MAX_DEPTH = 64  # nesting of values crossing a pipe
MAX_ITEMS = 1_000_000  # scalars and containers in one value
MAX_FRAME = 16 << 20  # bytes of one message
MAX_INPUT = 1 << 20  # bytes of a script, candidate module or test read from stdin
MAX_TEXT = 2000  # characters of an exception message or a reason

# Linux constants (include/uapi/linux/{mount,prctl,capability,seccomp,sched,filter,audit}.h)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 28, 38
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECBITS_LOCKED_NOROOT = 0x2F  # NOROOT and NO_SETUID_FIXUP set, those and KEEP_CAPS locked
CLONE_NEW_ANY = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
# (audit arch, clone, clone3, unshare, setns) per architecture; elsewhere no seccomp filter is installed
SYSCALLS = {"x86_64": (0xC000003E, 56, 435, 272, 308), "aarch64": (0xC00000B7, 220, 435, 97, 268)}

# What the fallback's audit hooks refuse outright, and the events whose path arguments must stay inside
# the work directory (index of each path argument).
REFUSED_EVENTS = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.setprofile", "sys.settrace", "sys.addaudithook", "os.chroot"})
REFUSED_MODULES = frozenset({"_ctypes", "ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                             "_testinternalcapi", "_socket", "socket", "_multiprocessing", "pty"})
PATH_EVENTS = {"os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.symlink": (0, 1),
               "os.link": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
               "os.mkfifo": (0,), "os.mknod": (0,)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND  # (every "ctypes.*" event too)


class CodecError(ValueError):
    """A value that cannot cross the pipe: unsupported type, too deep, too big, or a malformed message."""


class CandidateError(Exception):
    """The candidate failed in a way that is not a builtin exception (its own class, an exit, a crash)."""


# ----------------------------------------------------------------------------------------------------------
# Tagged JSON: values cross the pipes as [tag, payload] so tuples stay tuples, floats keep nan/inf/-0.0 and
# ints of any size (hex is not bound by int_max_str_digits). Only these exact types cross: a subclass (a
# str whose __eq__ always says True) would carry the candidate's code into the checker.


def encode(value: object, budget: list[int] | None = None, depth: int = 0) -> list:
    budget = [MAX_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise CodecError(f"more than {MAX_ITEMS} items")
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", format(value, "x")]
    if kind is float:
        return ["f", value.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in _CONTAINER_TAGS:
        return [_CONTAINER_TAGS[kind], [encode(v, budget, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, budget, depth + 1), encode(v, budget, depth + 1)] for k, v in value.items()]]
    raise CodecError(f"a value of type {kind.__name__} cannot cross the sandbox's pipe")


_CONTAINER_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode(tagged: object, depth: int = 0) -> object:
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
    if type(tagged) is not list or not tagged or type(tagged[0]) is not str:
        raise CodecError("malformed value")
    tag, rest = tagged[0], tagged[1:]
    try:
        if tag == "n" and not rest:
            return None
        (payload,) = rest
        if tag == "b" and type(payload) is bool:
            return payload
        if tag == "i" and type(payload) is str:
            return int(payload, 16)
        if tag == "f" and type(payload) is str:
            return float.fromhex(payload)
        if tag == "s" and type(payload) is str:
            return payload
        if tag == "y" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag in _CONTAINERS and type(payload) is list:
            return _CONTAINERS[tag](decode(v, depth + 1) for v in payload)
        if tag == "d" and type(payload) is list:
            pairs = [(decode(k, depth + 1), decode(v, depth + 1)) for k, v in payload]
            return dict(pairs)
    except (ValueError, TypeError, OverflowError) as exc:  # bad literal, unhashable key, wrong arity
        raise CodecError(f"malformed value ({exc})") from None
    raise CodecError(f"malformed value (tag {tag[:8]!r})")


def send(fd: int, message: dict) -> None:
    """One message: 4-byte big-endian length, then compact JSON."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise CodecError(f"a message of {len(data)} bytes (at most {MAX_FRAME})")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> dict | None:
    """The next message, or None at end of file (the other side exited)."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME:
        raise CodecError(f"a message of {size} bytes (at most {MAX_FRAME})")
    data = _read_exactly(fd, size)
    if data is None:
        raise CodecError("a message cut short")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"malformed message ({type(exc).__name__})") from None
    if type(message) is not dict:
        raise CodecError("malformed message")
    return message


# ----------------------------------------------------------------------------------------------------------
# Confinement


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols, libc's included


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_ATIME = {"noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
          "strictatime": MS_STRICTATIME, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes (\\040)."""
    parts = field.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, parents first (/proc/self/mountinfo order)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split(" ")
            point = _unescape(fields[4])
            flags = 0
            for option in fields[5].split(","):
                flags |= _ATIME.get(option, 0)
            out.append((point, flags))
    return out


def _mount(libc: ctypes.CDLL, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None), f"mount {target}")


def _filesystem(libc: ctypes.CDLL, config: dict, owner: int) -> None:
    """A fresh /proc for the new PID namespace, every mount read-only (flags a user namespace locks kept),
    then the only writable place: a size-capped tmpfs on /tmp, owned by the sandbox's user. /var/tmp and
    /dev/shm get an empty read-only tmpfs, so nothing left there by others can be read either."""
    # hidepid=2: a process sees only its own uid's processes (the worker never sees the checker)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    for point, keep in _mount_points():
        try:
            _mount(libc, "none", point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep, None)
        except OSError:
            # Refused for a mount point that another mount hides: fine as long as what is reachable there
            # is read-only.
            if os.path.exists(point) and not os.statvfs(point).f_flag & os.ST_RDONLY:
                raise
    size = f"size={config['disk_mb']}m,nr_inodes={config['inodes']}"
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0700,uid={owner},gid={owner}")
    for hidden in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(hidden):
            _mount(libc, "tmpfs", hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")


def _blocked_ancestor(path: str) -> str | None:
    """The outermost directory on the way to `path` that other users cannot enter (None if they can)."""
    parts = path.rstrip("/").split("/")
    for depth in range(2, len(parts)):
        ancestor = "/".join(parts[:depth])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:  # a sys.path entry that does not exist (python311.zip often does not)
            return None
    return None


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _hide(libc: ctypes.CDLL, hidden: list[str], private_too: bool) -> None:
    """Cover each `hidden` directory (calm's cache with the HumanEval tests, the user's home) with an empty
    read-only tmpfs; with `private_too`, also each directory the unused uid could not enter on the way to
    Python's own library (a pyenv under /root). Python's library is then bind-mounted back, read-only, at
    its path, so the candidate can still import math; nothing else of a covered directory is visible."""
    interpreter = sorted(p for p in sys.path if p and os.path.isdir(p))
    covers = {h for h in hidden if os.path.isdir(h)}
    if private_too:
        covers |= {b for b in map(_blocked_ancestor, interpreter) if b is not None}
    outermost = [c for c in covers if not any(c != other and _under(c, other) for other in covers)]
    held: dict[str, int] = {}
    for path in interpreter:
        if any(_under(path, c) for c in outermost) and not any(_under(path, kept) for kept in held):
            held[path] = os.open(path, os.O_PATH)  # still reachable through /proc/self/fd once covered
    for cover in outermost:
        _mount(libc, "tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for path, fd in held.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND, None)
        _mount(libc, "none", path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)
    for cover in outermost:
        _mount(libc, "none", cover, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=64k,mode=0755")


def _drop_bounding_set(libc: ctypes.CDLL) -> None:
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last = int(fh.read())
    for cap in range(last + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")


def _clear_capabilities(libc: ctypes.CDLL) -> None:
    """capset(2) with empty sets (version 3 header): the user-namespace root keeps its uid but no power."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc.capset(header, data), "capset")


def _seccomp(libc: ctypes.CDLL) -> bool:
    """Refuse new namespaces (unshare, setns, clone with CLONE_NEW*; clone3 says ENOSYS so libc falls back
    to clone): inside a new user namespace the code would be root again and could mount an uncapped tmpfs.
    False where the architecture is not known here."""
    machine = os.uname().machine
    if machine not in SYSCALLS:
        return False
    arch, clone, clone3, unshare, setns = SYSCALLS[machine]
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    program = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # another ABI (x32, 32-bit): killed
        (ld, 0, 0, 0),
        (jeq, 0, 1, clone3), (ret, 0, 0, enosys),
        (jeq, 0, 1, unshare), (ret, 0, 0, eperm),
        (jeq, 0, 1, setns), (ret, 0, 0, eperm),
        (jeq, 0, 3, clone), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NEW_ANY), (ret, 0, 0, eperm),
        (ret, 0, 0, allow)]
    if machine == "x86_64":  # x32 system calls share the architecture number: refuse them all
        program[3:4] = [(ld, 0, 0, 0), (0x35, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    filters = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(filters)
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    return True


def _rlimits(config: dict) -> None:
    memory, cpu, fsize = config["memory_mb"] << 20, config["cpu_s"], config["file_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU; hard: SIGKILL (init ignores XCPU)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_NPROC, (config["nproc"], config["nproc"]))


def prepare(config: dict) -> None:
    """What the whole sandbox shares, done as its namespace's root before any process in it drops
    privileges: the file system as docs/SANDBOX.md describes it. Nothing to do in the fallback."""
    if config["level"] == "audit-hooks":
        return
    libc = _libc()
    _filesystem(libc, config, config["uid"] if config["level"] == "namespaces" else 0)
    _hide(libc, config["hidden"], private_too=config["level"] == "namespaces")


def become(config: dict, uid: int, workdir: str, pdeathsig: bool) -> dict:
    """Confine this process: privileges, rlimits, seccomp, working directory, environment. `uid` is the
    unused uid to switch to (as root); `pdeathsig`: die with the parent (only where that parent is a
    single-threaded trusted process: the signal follows the parent thread). Returns what was done."""
    level = config["level"]
    done: dict = {"level": level}
    libc = _libc()
    _rlimits(config)
    # Root switches to the unused uid; without namespaces only if Python's own library is where other users
    # can reach it (else the candidate could not even import math).
    switch = level == "namespaces" or (level == "audit-hooks" and os.geteuid() == 0
                                       and not any(map(_blocked_ancestor, sys.path)))
    if switch:
        if workdir == config.get("workdir"):
            os.chown(workdir, uid, uid)
        _drop_bounding_set(libc)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to an unused uid: every capability goes with it
    elif level == "user-namespaces" or os.geteuid() == 0:
        # The user namespace's root, or root whose Python other users cannot reach: uid 0 without any
        # capability, which cannot come back through exec, still stays out of calm's and the checker's memory.
        _check(libc.prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, 0, 0, 0), "securebits")
        _drop_bounding_set(libc)
        _clear_capabilities(libc)
    done["uid_switched"] = switch
    if pdeathsig:  # after the uid change, which clears it
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # Not dumpable: a process of the same uid without CAP_SYS_PTRACE (the worker, for the checker) cannot
    # read its memory, descriptors or environment through /proc or ptrace.
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    if level != "audit-hooks":
        done["seccomp"] = _seccomp(libc)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8")
    done["workdir"] = workdir
    return done


def audit_hooks(workdir: str, max_files: int, hidden: list[str]) -> None:
    """The fallback's containment, installed just before untrusted code runs. Python-level only: code
    written to defeat it (racing a symlink swap between the check and the open, a bug in a C extension)
    can, which is why it is the fallback. Refuses sockets, new processes, signals, ctypes, walking other
    objects through gc, opening other processes' /proc entries, anything under `hidden` or in the shared
    temporary directories but Python's own library and `workdir`, and directories outside `workdir` (a
    directory descriptor would let a relative path escape the check); writes only inside `workdir`, at most
    `max_files` files or directories created (with RLIMIT_FSIZE: a bound on disk use).

    The untrusted code can reach this module (`import __main__`), so the hook keeps its own immutable
    copies of the tables and a counter that is a closure cell, not a module global it could rebind."""
    root = os.path.realpath(workdir) + os.sep
    own = str(os.getpid())
    refused, modules, write_flags = REFUSED_EVENTS, REFUSED_MODULES, WRITE_FLAGS
    path_events = types.MappingProxyType(dict(PATH_EVENTS))
    # The shared temporary directories too (the work directory is allowed below): a report calm or anyone
    # left there may quote a test line with its expected value.
    hidden_dirs = (*hidden, "/tmp", "/var/tmp", "/dev/shm", os.path.dirname(os.path.realpath(workdir)))
    allowed = (root.rstrip(os.sep), *(p for p in sys.path if p))
    creating = frozenset({"os.mkdir", "os.symlink", "os.link", "os.mkfifo", "os.mknod"})
    created = 0

    def forms(path: object) -> tuple[str, str]:
        text = os.fsdecode(path)
        return os.path.abspath(text), os.path.realpath(text)  # as written, and with links followed

    def others(path: object) -> bool:
        """A path into another process's /proc entry (its memory, its open pipes, its environment)."""
        for form in forms(path):
            parts = form.split("/")
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own:
                return True
        return False

    def hidden_file(path: object) -> bool:
        return any(_under(form, h) and not any(_under(form, a) for a in allowed)
                   for form in forms(path) for h in hidden_dirs)

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # a descriptor: opened through this hook already
        return all((form + os.sep).startswith(root) for form in forms(path))

    def refuse(what: str) -> None:
        raise PermissionError(f"calm sandbox: {what} is not allowed")

    def hook(event: str, args: tuple) -> None:
        nonlocal created
        if event in refused or event.startswith("ctypes."):
            refuse(event)
        if event == "import" and args[0] in modules:
            refuse(f"importing {args[0]}")
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            writing = (flags or 0) & write_flags or any(c in (mode or "") for c in "wax+")
            if others(path):
                refuse(f"opening {path!r} (another process)")
            if hidden_file(path):
                refuse(f"opening {path!r} (calm's or the user's files)")
            if (writing or os.path.isdir(path)) and not inside(path):
                refuse(f"opening {path!r} {'for writing' if writing else '(a directory)'} outside the work dir")
            if writing and not os.path.exists(path):
                created += 1
        elif event in path_events:
            for index in path_events[event]:
                if index < len(args) and not inside(args[index]):
                    refuse(f"{event} outside the work dir")
            created += event in creating
        if created > max_files:
            refuse(f"creating more than {max_files} files")

    # Functions that signal other processes without an audit event: gone from every module that holds them.
    for module in (signal, sys.modules.get("_signal")):
        module.__dict__.pop("pidfd_send_signal", None)
    os.__dict__.pop("pidfd_open", None)
    sys.addaudithook(hook)


# ----------------------------------------------------------------------------------------------------------
# Roles


def _read_input(fd: int = 0) -> str:
    with open(fd, "rb", closefd=fd != 0) as fh:
        data = fh.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise SystemExit(f"calm sandbox: input larger than {MAX_INPUT} bytes")
    return data.decode("utf-8", errors="replace")


_SOURCES: dict[str, str] = {}


def _source(name: str, text: str):
    """Compiled `text`, kept so a traceback can show its lines (`_print_exc`)."""
    _SOURCES[name] = text
    return compile(text, name, "exec", dont_inherit=True)


def _print_exc() -> None:
    """The current exception's traceback on stderr. traceback and linecache are imported only here: they
    cost a tenth of the start-up time, and most runs never fail."""
    import linecache
    import traceback

    for name, text in _SOURCES.items():
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    traceback.print_exc()


def _contain(config: dict) -> None:
    if config["level"] == "audit-hooks":
        audit_hooks(config["workdir"], config["max_files"], config["hidden"])


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def _message(exc: BaseException) -> str:
    try:
        return _short(str(exc))
    except Exception:  # the candidate's own __str__ may fail
        return "(no message)"


def _describe(exc: BaseException) -> str:
    message = _message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def script(config: dict) -> None:
    source = _read_input()
    code = _source("program.py", source)
    _contain(config)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - shown as Python would, then exit 1 as Python would
        _print_exc()
        raise SystemExit(1) from None


def worker(config: dict) -> None:
    """Load the candidate, then answer calls until the checker closes its end. Results and exceptions are
    data only; the candidate's own output goes to stdout/stderr (calm keeps the tail)."""
    calls, results = config["calls_fd"], config["results_fd"]
    source, entry = _read_input(), config["entry_point"]
    _contain(config)
    namespace: dict = {"__name__": "candidate", "__builtins__": builtins}
    try:
        exec(_source("candidate.py", source), namespace)
        function = namespace.get(entry)
        if not callable(function):
            raise NameError(f"candidate.py does not define a function {entry}")
    except BaseException as exc:  # noqa: BLE001 - a SyntaxError, an exit at import: all are the candidate's
        _print_exc()
        send(results, {"loaded": False, "error": _describe(exc)})
        return
    send(results, {"loaded": True})
    while (call := receive(calls)) is not None:
        try:
            args = decode(call["args"])
            kwargs = decode(call["kwargs"])
        except (CodecError, KeyError) as exc:
            send(results, {"raised": "CandidateError", "message": f"the call did not decode: {exc}"[:MAX_TEXT]})
            continue
        try:
            value = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure is an answer
            _print_exc()
            exited = isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit))
            send(results, {"raised": type(exc).__name__, "message": _message(exc), "exited": exited})
            continue
        try:
            reply = {"value": encode(value)}
        except (CodecError, RecursionError, MemoryError) as exc:
            reply = {"raised": "TypeError", "message": f"the result cannot be returned: {_describe(exc)}"}
        del value
        try:
            send(results, reply)
        except CodecError as exc:
            send(results, {"raised": "TypeError", "message": f"the result cannot be returned: {exc}"})


class Candidate:
    """The function under test as the checker sees it: each call goes to the worker and back as data."""

    def __init__(self, name: str, calls: int, results: int) -> None:
        self.__name__ = self.__qualname__ = name
        self.calls, self.results, self.count = calls, results, 0
        self.last = ""

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.count += 1
        shown = ", ".join([*map(_show, args), *(f"{k}={_show(v)}" for k, v in kwargs.items())])
        self.last = f"{self.__name__}({shown})"
        send(self.calls, {"args": encode(list(args)), "kwargs": encode(dict(kwargs))})
        try:
            reply = receive(self.results)
        except CodecError as exc:
            raise CandidateError(f"the candidate's answer was refused: {exc}") from None
        if reply is None:
            raise CandidateError("the candidate's process exited during a call")
        if "value" in reply:
            try:
                value = decode(reply["value"])
            except CodecError as exc:
                raise CandidateError(f"the candidate's answer was refused: {exc}") from None
            self.last += f" returned {_show(value)}"
            return value
        name, message = str(reply.get("raised", "?"))[:100], _short(str(reply.get("message", "")))
        self.last += f" raised {name}"
        if reply.get("exited"):
            raise CandidateError(f"the candidate exited during a call ({name}: {message})")
        # A builtin exception is raised as itself, so a test that expects one sees it; any other is named.
        cls = getattr(builtins, name, None)
        error = None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                error = cls(message)
            except Exception:  # a builtin that takes other arguments (UnicodeDecodeError)
                error = None
        raise error or CandidateError(f"{name}: {message}" if message else name)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


def _show(value: object) -> str:
    try:
        return _repr.repr(value)
    except ValueError:  # an int beyond int_max_str_digits
        return f"<{type(value).__name__}>"


def _reason(exc: BaseException, candidate: Candidate | None) -> str:
    """Why the check failed: the exception, the test line it came from, the last call and its answer."""
    reason = _describe(exc)
    lines, tb = [], exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "test.py":
            lines.append(tb.tb_lineno)
        tb = tb.tb_next
    test = _SOURCES.get("test.py", "").splitlines()
    if lines and 0 < lines[-1] <= len(test):
        reason += f" at test line {lines[-1]}: {test[lines[-1] - 1].strip()}"
    if candidate is not None and candidate.last:
        reason += f"; last call {candidate.last}"
    return _short(reason)


def checker(config: dict) -> None:
    """Run the test's check(candidate) against the worker; the verdict goes to calm on its own pipe."""
    calls, results, verdict = config["calls_fd"], config["results_fd"], config["verdict_fd"]
    task = json.loads(_read_input(config["task_fd"]))
    _contain(config)
    candidate = None
    try:
        namespace: dict = {"__name__": "check", "__builtins__": builtins}
        exec(_source("prompt.py", task["context"]), namespace)
        exec(_source("test.py", task["test"]), namespace)
        loaded = receive(results)
        if loaded is None:
            raise CandidateError("the candidate's process exited before it was ready")
        if not loaded.get("loaded"):
            raise CandidateError(f"the candidate did not load: {_short(str(loaded.get('error', 'no reason')))}")
        candidate = Candidate(task["entry_point"], calls, results)
        namespace[task["entry_point"]] = candidate  # a test that names the function gets the candidate too
        namespace["check"](candidate)
    except BaseException as exc:  # noqa: BLE001 - any way out of check() but returning is a failure
        send(verdict, {"passed": False, "reason": _reason(exc, candidate),
                       "calls": candidate.count if candidate else 0})
        return
    send(verdict, {"passed": True, "calls": candidate.count})


def probe(config: dict) -> None:
    """Report what confinement achieved, for level detection: calm accepts a level only if this holds."""
    import socket

    report = dict(config["done"])
    report["uid"], report["euid"] = os.getuid(), os.geteuid()
    with open("/proc/self/status") as fh:
        status = dict(line.split(":\t", 1) for line in fh.read().splitlines() if ":\t" in line)
    report["cap_eff"], report["no_new_privs"] = status["CapEff"].strip(), status.get("NoNewPrivs", "").strip()
    report["seccomp_mode"] = status.get("Seccomp", "").strip()
    report["pid"] = os.getpid()
    try:
        socket.create_connection(("127.0.0.1", config["port"]), timeout=2).close()
        report["network"] = "reached"
    except OSError as exc:
        report["network"] = f"refused ({exc.strerror or exc})"
    try:
        with open(os.path.join(config["outside"], "probe-write"), "w"):
            report["outside_write"] = "written"
    except OSError as exc:
        report["outside_write"] = f"refused ({exc.strerror})"
    with open("probe-write", "w") as fh:
        fh.write("ok")
    report["inside_write"] = "written"
    print(json.dumps(report))


def _fork(close: list[int], body: Callable[[], None]) -> int:
    """Run `body` in a child process after closing `close` there; the child never returns here."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in close:
            os.close(fd)
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported, and this child ends here whatever happened
        _print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or full stream: the exit matters more
                pass
        os._exit(code)


def pair(config: dict) -> None:
    """The HumanEval check: fork the worker, then the checker, each confined on its own (as root, each its
    own unused uid), joined by two pipes; wait for the checker and exit with its status. The test reaches
    the checker on a pipe this process never reads and the worker closes before anything untrusted runs:
    no copy of it ever exists in the worker's memory."""
    calls_r, calls_w = os.pipe()
    results_r, results_w = os.pipe()
    task, verdict, checker_err = config["task_fd"], config["verdict_fd"], config["checker_err_fd"]
    workdir = config["workdir"] if config["level"] == "audit-hooks" else "/tmp"

    def run_worker() -> None:
        done = become(config, config["uid"], workdir, pdeathsig=True)
        worker(config | {"done": done, "calls_fd": calls_r, "results_fd": results_w})

    def run_checker() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for target, source in ((0, devnull), (1, devnull), (2, checker_err)):
            os.dup2(source, target)
        os.close(devnull)
        done = become(config, config["checker_uid"], "/", pdeathsig=True)
        checker(config | {"done": done, "calls_fd": calls_w, "results_fd": results_r, "workdir": workdir})

    worker_pid = _fork([task, verdict, checker_err, calls_w, results_r], run_worker)
    os.close(calls_r)
    os.close(results_w)
    checker_pid = _fork([], run_checker)
    for fd in (calls_w, results_r, task, verdict, checker_err):
        os.close(fd)
    reaped = set()
    while True:  # as PID 1, this process also reaps whatever the worker left behind
        pid, status = os.wait()
        reaped.add(pid)
        if pid == checker_pid:
            break
    if config["level"] == "audit-hooks" and worker_pid not in reaped:  # no PID namespace to end it
        os.kill(worker_pid, signal.SIGKILL)
        os.waitpid(worker_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    raise SystemExit(code if code >= 0 else 128 - code)  # killed by a signal: 128 + its number, as a shell says


ROLES = {"script": script, "probe": probe}


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("pid_fd") is not None:
        # Tell calm our pid as the host sees it (the host's /proc is still mounted): calm kills this PID 1,
        # and with it the whole namespace, without touching the launcher that reaps it.
        os.write(config["pid_fd"], struct.pack(">Q", int(os.readlink("/proc/self"))))
        os.close(config["pid_fd"])
    prepare(config)
    if config["role"] == "pair":
        pair(config)
        return
    ns = config["level"] != "audit-hooks"
    config["done"] = become(config, config["uid"], "/tmp" if ns else config["workdir"], pdeathsig=ns)
    ROLES[config["role"]](config)


if __name__ == "__main__":
    main()
