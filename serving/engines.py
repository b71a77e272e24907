"""Prefill and decode engine servers: Ray Serve LLM's P/D servers plus per-replica stats and placement facts.

`PrefillServer`/`DecodeServer` subclass `PDPrefillServer`/`PDDecodeServer` (decode orchestrates: it sends the
prompt to its own DG's prefill deployment with `max_tokens=1`, receives the NIXL `kv_transfer_params`, then
decodes locally with the KV pulled over NIXL). What we add:

- `record_autoscaling_stats()`: decode tokens/s, KV-miss prefill tokens/s, TTFT/TBT percentiles, running and
  waiting requests, KV-cache usage (from `serving.engine_stats`), for Serve's autoscaling context;
- the same numbers as Prometheus gauges (`ray.util.metrics`, exported by Ray as `ray_heteroscale_engine_*`,
  tagged by role and deployment group);
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

logger = logging.getLogger(__name__)

STATS_WINDOW_S = 30.0  # look-back of the rates and percentiles a replica publishes
_PUBLISH_INTERVAL_S = 5.0
_GAUGES = (
    "decode_tokens_per_s", "prefill_computed_tokens_per_s", "prompt_external_tokens_per_s",
    "ttft_p90_s", "tbt_p90_s", "num_running", "num_waiting", "kv_cache_usage",
)


class _StatsMixin:
    """Shared by both roles. `_role` and `_group` come from the deployment's `llm_config.experimental_configs`."""

    _role = "unknown"
    _group = "unknown"

    def _init_stats(self) -> None:
        extra = self._llm_config.experimental_configs
        self._role = str(extra.get("heteroscale_role", self._role))
        self._group = str(extra.get("heteroscale_group", self._group))
        self._gauges = {
            name: ray_metrics.Gauge(f"heteroscale_engine_{name}", description=f"engine {name} (window "
                                    f"{STATS_WINDOW_S:.0f}s)", tag_keys=("role", "deployment_group"))
            for name in _GAUGES
        }
        tags = {"role": self._role, "deployment_group": self._group}
        for gauge in self._gauges.values():
            gauge.set_default_tags(tags)
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        while True:
            try:
                self._publish(ENGINE_STATS.snapshot(STATS_WINDOW_S).as_metrics())
            except Exception:  # never let metrics kill a replica
                logger.exception("publishing engine metrics failed")
            await asyncio.sleep(_PUBLISH_INTERVAL_S)

    def _publish(self, values: dict[str, float]) -> None:
        for name, gauge in self._gauges.items():
            gauge.set(values[name])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return ENGINE_STATS.snapshot(STATS_WINDOW_S).as_metrics()

    async def engine_stats(self, window_s: float = STATS_WINDOW_S) -> dict[str, Any]:
        snap = ENGINE_STATS.snapshot(window_s)
        return {"role": self._role, "deployment_group": self._group, **snap.__dict__}

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
