"""llama.cpp's OpenAI-compatible server (llama-cpp-python[server], `make bench-setup`) on loopback, serving one
pinned GGUF: the remote member of `calm bench --remote` and of the remote-member tests. Started as its own
process, so its CPU time is its own, and stopped (terminated, then killed) whatever happens to the caller."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from calm_cli.errors import UsageError

READY_S = 180.0


def available() -> bool:
    """Whether llama-cpp-python[server] is installed in this Python."""
    try:
        return importlib.util.find_spec("llama_cpp.server") is not None
    except ModuleNotFoundError:
        return False


def free_port() -> int:
    """A port nothing listens on at the moment, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` for `gguf`, known to clients as `alias`, at http://127.0.0.1:`port`/v1.
    start() waits until /v1/models answers; stop() ends it; start() again brings it back on the same port."""

    def __init__(self, gguf: Path, alias: str, port: int | None = None, threads: int = 1, context: int = 4096):
        if not available():
            raise UsageError("llama-cpp-python[server] is not installed: `make bench-setup` installs it")
        self.gguf, self.alias, self.threads, self.context = Path(gguf), alias, threads, context
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # its log (a request line each): a pipe nobody reads would fill and stall it

    def start(self) -> LlamaServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.context),
             # the prompt's threads too: the server's default for them is every core
             "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--verbose", "false"],
            stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace")[-1500:]
                self.process = None
                raise RuntimeError(f"the llama.cpp server for {self.gguf.name} exited at start: {tail}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the llama.cpp server for {self.gguf.name} was not ready within {READY_S:.0f} s")

    def cpu_s(self) -> float:
        """CPU-seconds the running server has used (user + system), from /proc: what its answers cost here."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
