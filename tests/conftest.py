"""Shared fixtures. Real-model tests pull the pinned fleet into calm's normal cache (verified, immutable, so
shared across runs); tests that break things get a private CALM_HOME."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

from calm_cli import settings
from calm_cli.fleet import lock
from calm_cli.fleet.pull import pull
from calm_cli.fleet.store import Store


def _quiet_progress(label: str, total: int, work: Callable[[Callable[[int], None]], None]) -> None:
    print(label, file=sys.stderr)
    work(lambda n: None)


@pytest.fixture(scope="session")
def fleet_store() -> Store:
    return Store(settings.path("cache_dir"))


@pytest.fixture(scope="session")
def source_dir(fleet_store: Store) -> Callable[[str], Path]:
    """name -> the model's verified source directory, pulled on first use."""
    specs = lock.load()

    def get(name: str) -> Path:
        return pull(specs[name], fleet_store, _quiet_progress)

    return get


@pytest.fixture(scope="session")
def gguf_file(source_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """name -> path of the model's verified GGUF file."""
    return lambda name: source_dir(name) / "model.gguf"


@pytest.fixture
def calm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty CALM_HOME for tests that must not touch the shared cache."""
    for var in ("CALM_CACHE_DIR", "CALM_DATA_DIR", "CALM_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CALM_HOME", str(tmp_path / "calm-home"))
    return tmp_path / "calm-home"
