"""GPU telemetry of one engine replica through NVML (`nvidia-ml-py`): the paper's GPU utilization and SM activity.

- GPU utilization: `nvmlDeviceGetUtilizationRates().gpu`, the share of the driver's last sample period (1/6 s to
  1 s, by GPU) in which any kernel ran. This is the "misleading" signal of the paper: a memory-bound decode
  engine keeps it near 100 % at light load.
- SM activity: on GPUs with GPU Performance Monitoring (Hopper and later: `nvmlGpmQueryDeviceSupport`), the
  GPM metric `NVML_GPM_METRIC_SM_UTIL` (share of SMs busy) between two GPM samples, one per `sample()` call.
  Older GPUs (Ampere, Ada such as L20/L40S) have no SM-activity metric in NVML: it is DCGM's profiling field
  `DCGM_FI_PROF_SM_ACTIVE` there (a DCGM exporter beside the engine), so the sampler reports it as missing
  (`sm_source == "unavailable"`), never as 0.
- Devices: the ones this process may use (`CUDA_VISIBLE_DEVICES`: indices or UUIDs), else all; a replica's value
  is the mean over its devices (a TP group's GPUs).
Where NVML cannot load (no driver: this CPU machine) `open_sampler` returns None with the reason, once; nothing
else changes. Pure logic over an injectable NVML module, so it is tested against a fake one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class GpuSample:
    devices: int
    gpu_utilization: float  # 0..1, mean over the devices
    sm_activity: float | None  # 0..1 (GPM), None where the GPUs have no NVML SM metric
    sm_source: str  # "gpm" or "unavailable"


class GpuSampler:
    def __init__(self, nvml: Any, handles: Sequence[Any]):
        self._nvml = nvml
        self._handles = list(handles)
        self._gpm = [self._gpm_supported(h) for h in self._handles]
        self._last: list[Any] = [None] * len(self._handles)  # previous GPM sample per device

    def _gpm_supported(self, handle) -> bool:
        try:
            return bool(self._nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except Exception:  # NVML too old for GPM, or the call is not supported on this device
            return False

    def sample(self) -> GpuSample:
        nvml = self._nvml
        utils, sms = [], []
        for i, handle in enumerate(self._handles):
            utils.append(nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            if self._gpm[i]:
                value = self._gpm_sm_util(i, handle)
                if value is not None:
                    sms.append(value)
        all_gpm = bool(self._handles) and all(self._gpm)
        return GpuSample(len(self._handles), sum(utils) / len(utils) if utils else 0.0,
                         sum(sms) / len(sms) if all_gpm and len(sms) == len(self._handles) else None,
                         "gpm" if all_gpm else "unavailable")

    def _gpm_sm_util(self, i: int, handle) -> float | None:
        """SM utilization between the previous GPM sample of device `i` and a new one (None on the first)."""
        nvml = self._nvml
        current = nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(handle, current)
        previous, self._last[i] = self._last[i], current
        if previous is None:
            return None
        try:
            request = nvml.c_nvmlGpmMetricsGet_t()
            request.version = nvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = 1
            request.sample1, request.sample2 = previous, current
            request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
            nvml.nvmlGpmMetricsGet(request)
            return min(max(request.metrics[0].value / 100.0, 0.0), 1.0)
        finally:
            nvml.nvmlGpmSampleFree(previous)

    def close(self) -> None:
        for sample in self._last:
            if sample is not None:
                self._nvml.nvmlGpmSampleFree(sample)
        self._last = [None] * len(self._handles)
        self._nvml.nvmlShutdown()


def visible_handles(nvml: Any, visible: str | None) -> list[Any]:
    """NVML handles of the devices `CUDA_VISIBLE_DEVICES` names (indices or GPU-/MIG- UUIDs), else all."""
    if visible is None or visible.strip() == "":
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for token in (t.strip() for t in visible.split(",")):
        if not token:
            continue
        if token.startswith(("GPU-", "MIG-")):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(token))
        else:
            try:
                index = int(token)
            except ValueError:
                raise ValueError(f"CUDA_VISIBLE_DEVICES entry {token!r} is neither an index nor a GPU-/MIG- UUID")
            handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
    return handles


def open_sampler(nvml: Any | None = None, visible: str | None = None) -> tuple[GpuSampler | None, str]:
    """(sampler, "") where NVML works and this process sees a GPU; (None, why) otherwise."""
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        nvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None, f"GPU telemetry not available: {exc}"
    try:
        handles = visible_handles(nvml, os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible)
    except Exception as exc:
        nvml.nvmlShutdown()
        return None, f"GPU telemetry not available: {exc}"
    if not handles:
        nvml.nvmlShutdown()
        return None, "GPU telemetry not available: no GPU visible to this process"
    return GpuSampler(nvml, handles), ""
