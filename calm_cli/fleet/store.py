"""The model cache on disk: where each model's files live, and how a directory becomes 'finished'.

A directory counts as finished only when its manifest.json exists. Work is staged in a sibling
`*.partial-<pid>` directory, the manifest is written last, and the directory is renamed into place, so an
interrupted pull or export never leaves anything that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from calm_cli.errors import CalmError

if TYPE_CHECKING:
    from calm_cli.fleet.lock import ModelSpec

MANIFEST = "manifest.json"
SOURCE = "source"


class IntegrityError(CalmError):
    """A file whose bytes are not the ones pinned or recorded."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, meta: dict) -> dict:
    """Record the sha256 and size of every file under `directory`, plus `meta`; written last."""
    files = {
        p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in _files_under(directory)
    }
    manifest = {**meta, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_dir(directory: Path) -> list[str]:
    """Every problem with a finished directory, one line each naming the file; empty when all is well."""
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory / MANIFEST}: missing or unreadable"]
    bad = []
    for rel, want in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            bad.append(f"{path}: size {path.stat().st_size}, expected {want['size']}")
        elif (got := sha256_file(path)) != want["sha256"]:
            bad.append(f"{path}: sha256 {got}, expected {want['sha256']}")
    extra = {p.relative_to(directory).as_posix() for p in _files_under(directory)} - set(manifest["files"])
    bad.extend(f"{directory / rel}: not in the manifest" for rel in sorted(extra))
    return bad


@dataclass(frozen=True)
class Store:
    """The cache root (settings: cache_dir) and its layout: models/<name>/{source,<precision>}/."""

    root: Path

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def source_dir(self, name: str) -> Path:
        return self.model_dir(name) / SOURCE

    def export_dir(self, name: str, precision: str) -> Path:
        return self.model_dir(name) / f"onnx-{precision}"

    def finished(self, directory: Path) -> bool:
        return (directory / MANIFEST).is_file()

    def exports(self, name: str) -> dict[str, Path]:
        """Finished exports of a model, by precision."""
        base = self.model_dir(name)
        if not base.is_dir():
            return {}
        return {
            d.name.removeprefix("onnx-"): d
            for d in sorted(base.glob("onnx-*"))
            if d.is_dir() and ".partial-" not in d.name and self.finished(d)
        }

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Serialise pulls and exports of one model across calm processes."""
        self.model_dir(name).mkdir(parents=True, exist_ok=True)
        with open(self.model_dir(name) / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def clear_stale(final: Path) -> None:
        """Remove staging directories a killed run left beside `final`; the caller holds the model's lock."""
        for stale in final.parent.glob(final.name + ".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def staged(self, final: Path) -> Iterator[Path]:
        """A fresh staging directory that replaces `final` only if the block completes and wrote a manifest."""
        final.parent.mkdir(parents=True, exist_ok=True)
        self.clear_stale(final)
        stage = final.parent / f"{final.name}.partial-{os.getpid()}"
        stage.mkdir()
        try:
            yield stage
            if not (stage / MANIFEST).is_file():
                raise RuntimeError(f"internal error: {stage} finished without a manifest")
            if final.exists():
                old = final.parent / f"{final.name}.partial-old-{os.getpid()}"
                final.rename(old)
                stage.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                stage.rename(final)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def verify(self, name: str) -> tuple[int, list[str]]:
        """(directories checked, one line per bad file) for a model's source and exports."""
        dirs = [d for d in (self.source_dir(name), *self.exports(name).values()) if d.exists()]
        return len(dirs), [line for d in dirs for line in verify_dir(d)]

    def describe(self, spec: ModelSpec) -> dict:
        """What `calm models list` shows of a model: its lock entry and what is on disk."""
        exports = self.exports(spec.name)
        state = "exported" if exports else "pulled" if self.finished(self.source_dir(spec.name)) else "missing"
        return {"name": spec.name, "role": spec.role, "parameters": spec.parameters,
                "precision": sorted(exports) or None, "state": state,
                "size_mb": round(self.size_on_disk(spec.name) / 2**20, 1), "licence": spec.licence,
                "path": str(self.model_dir(spec.name))}

    def size_on_disk(self, name: str) -> int:
        base = self.model_dir(name)
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) if base.is_dir() else 0
