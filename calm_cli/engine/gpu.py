"""NVIDIA GPU presence through NVML (package nvidia-ml-py); absent driver means no GPU, not an error."""

from __future__ import annotations

from functools import lru_cache

import pynvml


@lru_cache(maxsize=1)
def gpu_count() -> int:
    """How many NVIDIA GPUs the driver reports; 0 where NVML or the driver is missing."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVMLError_LibraryNotFound and friends: no driver here
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
