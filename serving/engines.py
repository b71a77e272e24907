"""Prefill and decode engine servers: Ray Serve LLM's P/D servers plus per-replica stats, reports and placement.

`PrefillServer`/`DecodeServer` subclass `PDPrefillServer`/`PDDecodeServer` (decode orchestrates: it sends the
prompt to its own DG's prefill deployment with `max_tokens=1`, receives the NIXL `kv_transfer_params`, then
decodes locally with the KV pulled over NIXL). What we add:

- a report to the service's controller every `report_interval_s` (when the service has one): cumulative
  generated and locally computed prompt tokens, TTFT/TBT histograms, running/waiting, KV usage, keyed by the
  replica id. Ray 2.60 collects `record_autoscaling_stats()` only with an `autoscaling_config`, which external
  scaling forbids, so the replica pushes. The answer says whether this replica is routable (soft scale-in,
  ready-ratio gating), and `record_routing_stats()` hands that to the request routers (`serving.routing`);
- the same numbers as Prometheus gauges (`ray.util.metrics`, exported by Ray as `ray_heteroscale_engine_*`,
  tagged by role and deployment group; a latency with no sample in the window is not set), plus GPU
  utilization and SM activity from NVML where GPUs exist (`serving.gpu_telemetry`; on CPU engines one log
  line says it is not available and those gauges stay unset);
- `engine_stats()` and `placement()` for the ingress, tests and `heteroscale status`;
- `DecodeServer.local_completions()`: a completion on this decode engine alone (no remote prefill), which
  diagnostics and the KV-transfer proof use to hand the engine explicit `kv_transfer_params`.

This module imports vLLM (through ray.llm); only engine processes import it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.serving_patterns.prefill_decode.pd_server import PDDecodeServer, PDPrefillServer
from ray.util import metrics as ray_metrics

from serving.engine_stats import ENGINE_STATS
from serving.gpu_telemetry import open_sampler
from serving.reporting import report_forever

logger = logging.getLogger(__name__)

STATS_WINDOW_S = 30.0  # look-back of the rates and percentiles a replica publishes
_PUBLISH_INTERVAL_S = 5.0
# Snapshot field -> exported gauge (`ray_heteroscale_engine_<name>`: Prometheus naming, base units, ratios 0-1).
_GAUGES = {
    "decode_tokens_per_s": "decode_tokens_per_second", "prefill_computed_tokens_per_s":
    "prefill_computed_tokens_per_second", "prompt_external_tokens_per_s": "prompt_external_tokens_per_second",
    "ttft_p50_s": "ttft_p50_seconds", "ttft_p90_s": "ttft_p90_seconds", "tbt_p50_s": "tbt_p50_seconds",
    "tbt_p90_s": "tbt_p90_seconds", "num_running": "running_requests", "num_waiting": "waiting_requests",
    "kv_cache_usage": "kv_cache_usage_ratio", "gpu_utilization": "gpu_utilization_ratio",
    "sm_activity": "sm_activity_ratio",
}


class _StatsMixin:
    """Shared by both roles. Role, group and controller come from the deployment's `experimental_configs`."""

    _role = "unknown"
    _group = "unknown"

    def _init_stats(self) -> None:
        extra = self._llm_config.experimental_configs
        self._role = str(extra.get("heteroscale_role", self._role))
        self._group = str(extra.get("heteroscale_group", self._group))
        self._service = str(extra.get("heteroscale_service", "unknown"))
        self._controller_name = extra.get("heteroscale_controller")  # None: fixed replica counts, always routable
        self._report_interval_s = float(extra.get("heteroscale_report_interval_s", 1.0))
        self._routable = self._controller_name is None
        from ray import serve

        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._gpu, why = open_sampler()
        if self._gpu is None:
            logger.info("%s replica %s: %s", self._role, self._replica_id, why)
        self._gpu_sample = None
        self._gauges = {
            field: ray_metrics.Gauge(f"heteroscale_engine_{name}", description=f"engine {field} (window "
                                     f"{STATS_WINDOW_S:.0f}s; GPU ones from NVML)",
                                     tag_keys=("service", "role", "deployment_group"))
            for field, name in _GAUGES.items()
        }
        tags = {"service": self._service, "role": self._role, "deployment_group": self._group}
        for gauge in self._gauges.values():
            gauge.set_default_tags(tags)
        loop = asyncio.get_running_loop()
        self._publisher = loop.create_task(self._publish_loop())
        self._reporter = loop.create_task(report_forever(
            self._controller_name, "report_replica", self._report_interval_s, self._report,
            self._on_answer)) if self._controller_name else None

    async def _publish_loop(self) -> None:
        while True:
            try:
                values = ENGINE_STATS.snapshot(STATS_WINDOW_S).as_metrics()
                if self._gpu is not None:
                    self._gpu_sample = self._gpu.sample()
                    values["gpu_utilization"] = self._gpu_sample.gpu_utilization
                    if self._gpu_sample.sm_activity is not None:
                        values["sm_activity"] = self._gpu_sample.sm_activity
                self._publish(values)
            except Exception:  # never let metrics kill a replica
                logger.exception("publishing engine metrics failed")
            await asyncio.sleep(_PUBLISH_INTERVAL_S)

    def _publish(self, values: dict[str, float]) -> None:
        for name, gauge in self._gauges.items():
            if name in values:  # a latency without a sample stays unset, never 0
                gauge.set(values[name])

    def _report(self) -> dict[str, Any]:
        snap = ENGINE_STATS.snapshot(STATS_WINDOW_S)
        hists = ENGINE_STATS.histograms()
        return {"replica_id": self._replica_id, "group": self._group, "role": self._role,
                "generation_tokens": snap.total_generation_tokens,
                "prompt_computed_tokens": snap.total_prompt_computed_tokens,
                "num_running": int(snap.num_running), "num_waiting": int(snap.num_waiting),
                "kv_cache_usage": snap.kv_cache_usage, "tbt_hist": hists["tbt"], "ttft_hist": hists["ttft"],
                "gpu_utilization": self._gpu_sample.gpu_utilization if self._gpu_sample else None,
                "sm_activity": self._gpu_sample.sm_activity if self._gpu_sample else None}

    def _on_answer(self, answer: dict) -> None:
        """The controller's answer says whether this replica is routable (the last answer stands meanwhile)."""
        self._routable = bool(answer.get("routable", self._routable))

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request routers of callers (`serving.routing.AdmittedReplicaRouter`)."""
        return {"routable": self._routable}

    async def engine_stats(self, window_s: float = STATS_WINDOW_S) -> dict[str, Any]:
        snap = ENGINE_STATS.snapshot(window_s)
        return {"role": self._role, "deployment_group": self._group, "replica_id": self._replica_id,
                "routable": self._routable, **snap.__dict__}

    async def placement(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"role": self._role, "deployment_group": self._group, "node_id": ctx.get_node_id(),
                "labels": ctx.get_node_labels()}


class PrefillServer(_StatsMixin, PDPrefillServer):
    async def __init__(self, llm_config, **kwargs):
        await super().__init__(llm_config, **kwargs)
        self._init_stats()


class DecodeServer(_StatsMixin, PDDecodeServer):
    async def __init__(self, llm_config, *, prefill_server, **kwargs):
        await super().__init__(llm_config, prefill_server=prefill_server, **kwargs)
        self._init_stats()

    async def local_completions(self, request):
        """Run a completion on this engine only (no remote prefill); returns the non-streamed response."""
        gen = await LLMServer.completions(self, request)
        last = None
        async for chunk in gen:
            last = chunk
        return last
