"""`calm models export`: GGUF -> transformers -> Optimum ONNX, then the GGUF's own blocks as MatMulNBits.

The heavy work runs in a child process (`python -m calm_cli.fleet.export_worker`) so that torch never enters
the calling process, each model's peak memory is measured on its own, and the memory is returned to the
system before the next model. The parent stages the output and writes the manifest last (see store.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import Store, write_manifest

EXPORT_STACK = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime",
                "accelerate", "gguf", "tokenizers")
INSTALL_HINT = "install the export extra: pip install -e '.[export]' (in calm's virtual environment)"


class ExportError(RuntimeError):
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
        with store.staged(final) as stage:
            cmd = [sys.executable, "-m", "calm_cli.fleet.export_worker", "--model", spec.name,
                   "--precision", precision, "--source", str(source), "--out", str(stage),
                   "--work", str(store.root / "tmp")]
            echo(f"exporting {spec.name} ({precision}) ...")
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
                tail: list[str] = []
                for line in proc.stderr:  # the worker's progress, passed on as it comes
                    echo(line.rstrip("\n"))
                    tail = (tail + [line.rstrip()])[-8:]
                stdout = proc.stdout.read()
            if proc.returncode != 0:
                raise ExportError(f"{spec.name} ({precision}): export failed (exit {proc.returncode}); nothing was "
                                  "kept. Last messages:\n" + "\n".join(tail))
            report = json.loads(stdout.strip().splitlines()[-1])
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
        echo(f"exported {spec.name} ({precision}) in {report['seconds']} s, "
             f"peak memory {report['peak_rss_mb']} MB")
    return final
