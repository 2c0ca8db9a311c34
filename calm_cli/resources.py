"""Where calm's own shipped files live: models.lock, schemas/ and policies/, read as package data.

The reviewed files sit at the project root. calm_cli/data/ holds relative symlinks to them, which setuptools
follows when it builds a wheel or an sdist: an installed calm reads real copies inside its package, an
editable one (`make demo`, `pip install -e`) reads the root files themselves, both through the same path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _data_dir() -> Path:
    """The package's data folder as a real directory: the readers stat and open these paths (bounded.py)."""
    data = files("calm_cli") / "data"
    if not isinstance(data, Path):  # a zipped import; pip always installs calm as plain files
        raise ImportError(f"calm's package data must be plain files on disk, not {data}: install calm with pip")
    return data


ROOT = _data_dir()
# Resolved, so that messages from an editable install name the root files, the ones to edit.
LOCK = (ROOT / "models.lock").resolve()
SCHEMAS = (ROOT / "schemas").resolve()
POLICIES = (ROOT / "policies").resolve()
