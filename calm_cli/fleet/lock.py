"""models.lock: the pinned offline fleet, loaded and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calm_cli import schema
from calm_cli.errors import UsageError
from calm_cli.resources import LOCK


class UnknownModel(UsageError):
    """A model name that models.lock does not define."""

    def __str__(self) -> str:
        name, known = self.args
        return f"unknown model {name!r}; models.lock defines: {', '.join(known)}"


@dataclass(frozen=True)
class LockedFile:
    name: str
    sha256: str
    size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str
    family: str
    architecture: str
    parameters: str
    quantization: str
    licence: str
    licence_files: tuple[str, ...]
    packages: tuple[tuple[str, str], ...]
    files: tuple[LockedFile, ...]
    prompt: dict
    task: str
    precisions: tuple[str, ...]
    accuracy_levels: dict  # MatMulNBits accuracy_level for 4-bit and 8-bit weights ({"4bit": n, "8bit": n})

    @property
    def generative(self) -> bool:
        return self.task == "text-generation-with-past"

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    @property
    def gguf(self) -> LockedFile | None:
        return next((f for f in self.files if f.name.endswith(".gguf")), None)


def load(path: Path = LOCK) -> dict[str, ModelSpec]:
    """Every model of the lock file, in file order; an invalid file raises schema.InvalidFile."""
    data = schema.load_yaml(path)
    schema.validate(data, "models-lock.schema.json", str(path))
    return {
        name: ModelSpec(
            name=name,
            role=m["role"],
            family=m["family"],
            architecture=m["architecture"],
            parameters=m["parameters"],
            quantization=m["quantization"],
            licence=m["licence"]["name"],
            licence_files=tuple(m["licence"]["files"]),
            packages=tuple((p["name"], p["version"]) for p in m["packages"]),
            files=tuple(LockedFile(f["name"], f["sha256"], f["size"], tuple(f["chunks"])) for f in m["files"]),
            prompt=m["prompt"],
            task=m["export"]["task"],
            precisions=tuple(m["export"]["precisions"]),
            accuracy_levels={"4bit": 4, "8bit": 4, **m["export"].get("accuracy_level", {})},
        )
        for name, m in data["models"].items()
    }


def select(models: dict[str, ModelSpec], names: tuple[str, ...] | list[str]) -> list[ModelSpec]:
    """The named models (all of them when none are named); an unknown name is refused before any work."""
    if not names:
        return list(models.values())
    for name in names:
        if name not in models:
            raise UnknownModel(name, list(models))
    return [models[n] for n in dict.fromkeys(names)]
