"""`calm models export`: GGUF -> transformers -> Optimum ONNX, then the GGUF's own blocks as MatMulNBits.

The heavy work runs in a child process (`python -m calm_cli.fleet.export_worker`) so that torch never enters
the calling process, each model's peak memory is measured on its own, and the memory is returned to the
system before the next model. The parent stages the output and writes the manifest last (see store.py).

The user sees one line per model and phase; the exporters' own output (dozens of TracerWarnings, Optimum's
chatter) goes to a log file under the cache, named in the first line and quoted when the export fails.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from calm_cli.errors import CalmError
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import Store, write_manifest

EXPORT_STACK = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime",
                "accelerate", "gguf", "tokenizers")
INSTALL_HINT = "install the export extra: pip install -e '.[export]' (in calm's virtual environment)"
LOG_TAIL_LINES = 12


class ExportError(CalmError):
    """An export that did not finish; nothing that looks finished is left behind."""


class ExtraMissing(ExportError):
    """The [export] extra (torch, transformers, optimum...) is not installed."""


def check_extra() -> None:
    missing = []
    for module in ("torch", "transformers", "optimum.exporters.onnx", "onnx", "gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExtraMissing(f"calm models export needs {', '.join(missing)}: {INSTALL_HINT}")


def stack_versions() -> dict[str, str]:
    out = {}
    for dist in EXPORT_STACK:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def log_path(store: Store, name: str, precision: str) -> Path:
    """The exporters' own output for one model and precision; each export run overwrites it."""
    return store.root / "logs" / f"export-{name}-{precision}.log"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        return [line.rstrip("\n") for line in collections.deque(fh, lines)]


def _run_worker(cmd: list[str], name: str, log: Path, echo: Callable[[str], None]) -> tuple[int, dict | None]:
    """Runs the worker with its stderr in `log`, echoing each phase it announces; (exit status, report)."""
    report = None
    with log.open("w", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sink, text=True) as proc:
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if isinstance(message, dict) and "phase" in message:
                    echo(f"{name}: {message['phase']}")
                elif isinstance(message, dict) and "report" in message:
                    report = message["report"]
                else:  # the worker sends nothing else on stdout; keep any stray line where it can be read
                    sink.write(line)
                    sink.flush()
    return proc.returncode, report


def precision_for(spec: ModelSpec, requested: str | None) -> str:
    """The precision to export: the one asked for, else the lock's first; int4 means int8 for an encoder."""
    wanted = requested or spec.default_precision
    return "int8" if wanted == "int4" and not spec.generative else wanted


def export(spec: ModelSpec, store: Store, precision: str, echo: Callable[[str], None]) -> Path:
    """The finished export directory of `spec` at `precision`, built unless it already exists."""
    if precision not in spec.precisions:
        raise ExportError(f"{spec.name}: precision {precision!r} is not one of {', '.join(spec.precisions)}")
    source = store.source_dir(spec.name)
    if not store.finished(source):
        raise ExportError(f"{spec.name}: not pulled yet: run `calm models pull {spec.name}` first")
    final = store.export_dir(spec.name, precision)
    with store.locked(spec.name):
        if store.finished(final):
            return final
        check_extra()
        source_manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
        started = time.perf_counter()
        log = log_path(store, spec.name, precision)
        log.parent.mkdir(parents=True, exist_ok=True)
        with store.staged(final) as stage:
            cmd = [sys.executable, "-m", "calm_cli.fleet.export_worker", "--model", spec.name,
                   "--precision", precision, "--source", str(source), "--out", str(stage),
                   "--work", str(store.root / "tmp")]
            echo(f"{spec.name}: exporting {precision} (exporter messages: {log})")
            status, report = _run_worker(cmd, spec.name, log, echo)
            if status != 0 or report is None:
                why = f"exit {status}" if status != 0 else "no report"
                raise ExportError(f"{spec.name} ({precision}): export failed ({why}); nothing was kept. "
                                  f"Last lines of {log}:\n" + "\n".join(_tail(log)))
            report["seconds"] = round(time.perf_counter() - started, 1)
            write_manifest(stage, {
                "kind": "export",
                "model": spec.name,
                "precision": precision,
                "task": spec.task,
                "source_sha256": {f: v["sha256"] for f, v in source_manifest["files"].items()
                                  if not f.startswith("LICENSES/")},
                "stack": stack_versions(),
                "report": report,
            })
        echo(f"{spec.name}: done in {report['seconds']:.0f} s, peak {report['peak_rss_mb'] * 2**20 / 1e9:.1f} GB")
    return final
