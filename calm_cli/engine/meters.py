"""Energy and memory of each generation: NVML where an NVIDIA GPU is, an honest estimate elsewhere.

On a GPU, energy is the delta of NVML's total-energy counter (mJ since driver load): the whole device's,
idle draw included (about 90 W on an H100), so it is real but not the work's own share; memory is NVML's
figure for this process. NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES: CALM_DEVICE_ID must
name the same GPU in both numberings (it does unless CUDA_VISIBLE_DEVICES reorders them). Without NVML there
is no energy counter here (no RAPL), so energy is process CPU-seconds x watts per core (setting
CALM_WATTS_PER_CORE) and every record says it is estimated; memory is the resident-set size of this process.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import pynvml

from calm_cli import settings
from calm_cli.engine.gpu import gpu_count


def rss_mb() -> float:
    """Resident set size of this process now (not the peak)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Reading:
    energy_j: float
    energy_estimated: bool
    seconds: float


class EnergyMeter:
    """Brackets a piece of work; `read()` gives the joules it took and whether they are estimated."""

    def __init__(self, on_gpu: bool):
        self.handle = None
        if on_gpu and gpu_count() > 0:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(settings.get("device_id")))
        self.watts_per_core = float(settings.get("watts_per_core"))

    def _sample(self) -> tuple[float, float]:
        if self.handle is not None:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0, time.perf_counter()
        return _cpu_seconds(), time.perf_counter()

    def start(self) -> None:
        self.begin = self._sample()

    def read(self) -> Reading:
        value, now = self._sample()
        delta = value - self.begin[0]
        if self.handle is not None:
            return Reading(delta, False, now - self.begin[1])
        return Reading(delta * self.watts_per_core, True, now - self.begin[1])

    def memory_mb(self) -> float:
        """This process's memory on the GPU (NVML's per-process figure); its resident set on CPU.

        Where NVML cannot see our pid (a PID namespace), the device's used memory is the honest upper bound.
        """
        if self.handle is None:
            return rss_mb()
        mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                if p.pid == os.getpid() and p.usedGpuMemory is not None]
        if mine:
            return sum(mine) / 2**20
        return pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
