"""Where calm's own shipped files live: models.lock, schemas/ and policies/ sit at the project root."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "models.lock"
SCHEMAS = ROOT / "schemas"
POLICIES = ROOT / "policies"
