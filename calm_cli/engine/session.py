"""onnxruntime sessions: the CUDA provider where an NVIDIA GPU is usable, the CPU provider otherwise.

onnxruntime falls back from CUDA to CPU with only a log line, so the provider reported is always the one the
session actually uses (session.get_providers()), never the one asked for.
"""

from __future__ import annotations

from pathlib import Path

import inspect

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state

from calm_cli import settings
from calm_cli.engine.gpu import gpu_count
from calm_cli.errors import CalmError

# onnxruntime's own errors (Fail, InvalidProtobuf, InvalidArgument...) derive from Exception only: this is how a
# member tells a failed load or run from a bug in calm.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    c for c in vars(onnxruntime_pybind11_state).values() if inspect.isclass(c) and issubclass(c, Exception))


class ProviderError(CalmError):
    """The provider named by CALM_PROVIDER cannot be used here."""


def requested_providers() -> list[str | tuple[str, dict]]:
    """Providers to ask for, in order, from the `provider` and `device_id` settings."""
    choice = settings.get("provider")
    # onnxruntime-gpu lists CUDA as available even on a machine without a GPU: ask the driver too.
    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and gpu_count() > 0
    if choice == "cuda" and not cuda_ok:
        raise ProviderError("CALM_PROVIDER=cuda, but no NVIDIA GPU is visible (NVML) or this onnxruntime build "
                            "has no CUDAExecutionProvider")
    if choice == "cpu" or not cuda_ok:
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": settings.get("device_id")})
    return [cuda, "CPUExecutionProvider"]


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(settings.get("threads"))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", str(settings.get("spin")))
    options.log_severity_level = 3
    return options


FUSED_GRAPH = "model.fused.onnx"  # written by calm_cli.fleet.graph.fuse next to Optimum's model.onnx


def decoder_graph(directory: Path) -> Path:
    """The decoder graph to serve from an export directory.

    The fused graph (GroupQueryAttention, KV cache updated in place) where the export has one and the CPU
    provider will run it: onnxruntime's CUDA GroupQueryAttention has no float32 kernel, so under CUDA
    Optimum's plain graph serves, its cache kept on the device by the caller.
    """
    fused = directory / FUSED_GRAPH
    if fused.is_file() and requested_providers()[0] == "CPUExecutionProvider":
        return fused
    return directory / "model.onnx"


def open_session(model: Path) -> ort.InferenceSession:
    """A session on the best provider; check `provider_of(session)` for what was granted."""
    session = ort.InferenceSession(str(model), sess_options=session_options(), providers=requested_providers())
    if settings.get("provider") == "cuda" and provider_of(session) != "CUDAExecutionProvider":
        raise ProviderError(f"CALM_PROVIDER=cuda, but onnxruntime fell back to {provider_of(session)} for {model}")
    return session


def provider_of(session: ort.InferenceSession) -> str:
    return session.get_providers()[0]
