"""The NVML sampler (`serving.gpu_telemetry`) against a fake NVML: utilization over a replica's devices, SM
activity from GPM samples on Hopper-class GPUs, missing (not 0) on older ones, device selection from
CUDA_VISIBLE_DEVICES, and a clean "not available" where NVML cannot load (this CPU machine)."""

from types import SimpleNamespace

import pytest

from serving.gpu_telemetry import open_sampler


class FakeNvml:
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_SM_UTIL = 2

    class c_nvmlGpmMetricsGet_t:  # noqa: N801 (NVML's name)
        def __init__(self):
            self.version = self.numMetrics = 0
            self.sample1 = self.sample2 = None
            self.metrics = [SimpleNamespace(metricId=0, value=0.0) for _ in range(4)]

    def __init__(self, gpus, gpm=True, fail_init=None):
        # gpus: uuid -> {"util": percent, "sm_busy": cumulative SM-busy seconds, "t": cumulative seconds}
        self.gpus, self.order, self.gpm, self.fail_init = gpus, list(gpus), gpm, fail_init
        self.allocated = self.freed = 0
        self.initialized = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init
        self.initialized = True

    def nvmlShutdown(self):
        self.initialized = False

    def nvmlDeviceGetCount(self):
        return len(self.order)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.order[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.gpus:
            raise KeyError(uuid)
        return uuid

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.gpus[h]["util"], memory=0)

    def nvmlGpmQueryDeviceSupport(self, h):
        return SimpleNamespace(isSupportedDevice=int(self.gpm))

    def nvmlGpmSampleAlloc(self):
        self.allocated += 1
        return {}

    def nvmlGpmSampleGet(self, h, sample):
        sample.update(device=h, sm_busy=self.gpus[h]["sm_busy"], t=self.gpus[h]["t"])

    def nvmlGpmSampleFree(self, sample):
        self.freed += 1

    def nvmlGpmMetricsGet(self, request):
        a, b = request.sample1, request.sample2
        assert a["device"] == b["device"] and request.metrics[0].metricId == self.NVML_GPM_METRIC_SM_UTIL
        request.metrics[0].value = 100.0 * (b["sm_busy"] - a["sm_busy"]) / (b["t"] - a["t"])
        return request


def gpus(*utils):
    return {f"GPU-{i}": {"util": u, "sm_busy": 0.0, "t": 0.0} for i, u in enumerate(utils)}


def advance(nvml, uuid, seconds, sm_share):
    g = nvml.gpus[uuid]
    g["t"] += seconds
    g["sm_busy"] += seconds * sm_share


def test_hopper_class_gpus_report_utilization_and_gpm_sm_activity_over_the_replicas_devices():
    nvml = FakeNvml(gpus(10, 95, 85, 0))
    sampler, why = open_sampler(nvml, visible="1,2")  # a TP2 replica on devices 1 and 2
    assert why == "" and sampler is not None
    first = sampler.sample()
    assert (first.devices, first.gpu_utilization, first.sm_source) == (2, pytest.approx(0.90), "gpm")
    assert first.sm_activity is None  # GPM needs two samples
    advance(nvml, "GPU-1", 10, 0.30)
    advance(nvml, "GPU-2", 10, 0.20)
    second = sampler.sample()
    assert second.sm_activity == pytest.approx(0.25)  # high utilization, low SM activity: memory-bound decode
    sampler.close()
    assert nvml.allocated == nvml.freed == 4 and not nvml.initialized  # every GPM sample freed


def test_gpus_without_gpm_report_sm_activity_as_missing_not_zero():
    nvml = FakeNvml(gpus(70), gpm=False)
    sampler, _ = open_sampler(nvml, visible="")
    for _ in range(2):
        sample = sampler.sample()
        assert sample.gpu_utilization == pytest.approx(0.70)
        assert (sample.sm_activity, sample.sm_source) == (None, "unavailable")
    assert nvml.allocated == 0


def test_devices_by_uuid_and_bad_entries_named():
    nvml = FakeNvml(gpus(40, 60))
    sampler, _ = open_sampler(nvml, visible="GPU-1")
    assert sampler.sample().gpu_utilization == pytest.approx(0.60)
    sampler, why = open_sampler(FakeNvml(gpus(40)), visible="0,two")
    assert sampler is None and "'two' is neither an index nor a GPU-/MIG- UUID" in why


def test_no_nvml_is_reported_once_as_not_available():
    sampler, why = open_sampler(FakeNvml({}, fail_init=OSError("NVML Shared Library Not Found")))
    assert sampler is None and why == "GPU telemetry not available: NVML Shared Library Not Found"
    sampler, why = open_sampler(FakeNvml({}), visible=None)
    assert sampler is None and why.endswith("no GPU visible to this process")


def test_the_real_nvml_on_this_machine():
    """On a machine without an NVIDIA driver (this CPU box, CI) the real library says so cleanly; where a GPU is
    visible it samples."""
    sampler, why = open_sampler()
    if sampler is None:
        assert why.startswith("GPU telemetry not available")
    else:
        sample = sampler.sample()
        assert sample.devices >= 1 and 0 <= sample.gpu_utilization <= 1
        sampler.close()
