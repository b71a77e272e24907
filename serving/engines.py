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
  diagnostics and the KV-transfer proof use to hand the engine explicit `kv_transfer_params`;
- prefill faults (NIXL's sequential handoff): a remote prefill whose replica dies is tried again on another
  replica of the DG (`engine.prefill_attempts` in all); each prefill answer names the replica that holds the KV,
  and while the decode engine waits for that KV (until its first output) the decode server checks every
  `engine.prefill_probe_interval_s` that the replica lives. vLLM has no deadline of its own for a pull from a
  dead peer; on a dead one the local request is aborted (its KV blocks freed) and the prefill tried again. Out of
  tries, the request fails with a 503 error, never a hang.

This module imports vLLM (through ray.llm); only engine processes import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncGenerator

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.util import metrics as ray_metrics

from common import histogram
from common.wire import ENGINE_OPTIONS_KEY, EngineOptions, ReplicaReport
from serving.engine_stats import ENGINE_STATS
from serving.gpu_telemetry import open_sampler
from serving.ray_llm import (ChatCompletionRequest, ErrorInfo, ErrorResponse, LLMServer, PDDecodeServer,
                             PDPrefillServer, SERVE_NAMESPACE, reuse_prompt_token_ids, session_id_from_headers)
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
        opts = self._options()
        self._role, self._group, self._service = opts.role, opts.group, opts.service
        self._controller_name = opts.controller  # None: fixed replica counts, always routable
        self._report_interval_s = opts.report_interval_s
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
                                     tag_keys=("service", "role", "deployment_group", "replica"))
            for field, name in _GAUGES.items()
        }
        # `replica`: the Prometheus signal source checks every RUNNING replica has series (bounded: live ones)
        tags = {"service": self._service, "role": self._role, "deployment_group": self._group,
                "replica": self._replica_id}
        for gauge in self._gauges.values():
            gauge.set_default_tags(tags)
        # TBT as a histogram on the push path's buckets: the Prometheus signal source takes any quantile of the
        # decode replicas' merged counts over its window, as the push path does (a gauge fixed one quantile).
        self._tbt_hist = ray_metrics.Histogram(
            "heteroscale_engine_tbt_seconds", description="time between tokens (common.histogram buckets)",
            boundaries=list(histogram.BOUNDS_S), tag_keys=("service", "role", "deployment_group"))
        self._tbt_hist.set_default_tags({k: tags[k] for k in ("service", "role", "deployment_group")})
        self._tbt_published = histogram.empty()
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

    def _options(self) -> EngineOptions:
        """This replica's options from its deployment (`common.wire.EngineOptions`, set by `serving.app`)."""
        return EngineOptions.from_wire(self._llm_config.experimental_configs.get(ENGINE_OPTIONS_KEY))

    def _publish(self, values: dict[str, float]) -> None:
        for name, gauge in self._gauges.items():
            if name in values:  # a latency without a sample stays unset, never 0
                gauge.set(values[name])
        counts = ENGINE_STATS.histograms()["tbt"]
        for i, n in enumerate(histogram.delta(counts, self._tbt_published)):
            for _ in range(n):  # the same bucket on both sides: any value inside it stands for its samples
                self._tbt_hist.observe(histogram.inside(i))
        self._tbt_published = counts

    def _report(self) -> dict[str, Any]:
        snap = ENGINE_STATS.snapshot(STATS_WINDOW_S)
        hists = ENGINE_STATS.histograms()
        return ReplicaReport(self._replica_id, self._group, self._role, snap.total_generation_tokens,
                             snap.total_prompt_computed_tokens, int(snap.num_running), int(snap.num_waiting),
                             snap.kv_cache_usage, tuple(hists["tbt"]), tuple(hists["ttft"]),
                             self._gpu_sample.gpu_utilization if self._gpu_sample else None,
                             self._gpu_sample.sm_activity if self._gpu_sample else None).to_wire()

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


# Our key in a prefill answer's `kv_transfer_params`: [namespace, actor name] of the prefill replica holding the
# KV. The decode server takes it out before the decode engine sees the params.
PREFILL_REPLICA_KEY = "heteroscale_prefill_replica"
# A remote prefill that fails with one of these lost its replica (died, or gone between choice and call).
_PREFILL_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
_RETRY_BACKOFF_S = 0.2


def _without_holder(kv_transfer_params: dict | None) -> tuple[dict, list[str] | None]:
    """A prefill answer's KV params split into what the decode engine gets and the KV holder we tagged."""
    params = dict(kv_transfer_params or {})
    return params, params.pop(PREFILL_REPLICA_KEY, None)


class _PrefillLost(Exception):
    """The prefill replica holding a request's KV died before the decode engine had pulled it."""


def _actor_alive(namespace: str, name: str) -> bool:
    """False only when Ray says the named actor is gone; an unanswered lookup (GCS busy) is not a death."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:  # no live actor of that name: a dead replica's name is released
        return False
    except Exception as exc:
        logger.warning("could not look up prefill replica %s: %s: %s", name, type(exc).__name__, exc)
    return True


async def _name_kv_holder(gen: AsyncGenerator, holder: list[str]) -> AsyncGenerator:
    """Re-yield a prefill answer with the replica that holds its KV named in `kv_transfer_params`."""
    async for chunk in gen:
        for item in chunk if isinstance(chunk, list) else [chunk]:
            params = getattr(item, "kv_transfer_params", None)
            if isinstance(params, dict):
                item.kv_transfer_params = {**params, PREFILL_REPLICA_KEY: holder}
        yield chunk


class PrefillServer(_StatsMixin, PDPrefillServer):
    async def __init__(self, llm_config, **kwargs):
        await super().__init__(llm_config, **kwargs)
        self._holder = [SERVE_NAMESPACE, ray.get_runtime_context().get_actor_name()]  # (the job's is another)
        self._init_stats()

    async def completions(self, request, raw_request_info=None):
        return _name_kv_holder(await super().completions(request, raw_request_info), self._holder)

    async def chat(self, request, raw_request_info=None):
        return _name_kv_holder(await super().chat(request, raw_request_info), self._holder)


class DecodeServer(_StatsMixin, PDDecodeServer):
    async def __init__(self, llm_config, *, prefill_server, **kwargs):
        await super().__init__(llm_config, prefill_server=prefill_server, **kwargs)
        opts = self._options()
        self._prefill_attempts, self._probe_interval_s = opts.prefill_attempts, opts.prefill_probe_interval_s
        self._liveness: dict[tuple[str, str], tuple[float, asyncio.Future]] = {}
        self._prefill_tries_lost = 0  # prefill tries lost to a dead replica (each retried or, if the last, failed)
        self._prefill_failures = 0  # requests failed after every try was lost
        self._init_stats()

    async def engine_stats(self, window_s: float = STATS_WINDOW_S) -> dict[str, Any]:
        return {**await super().engine_stats(window_s), "prefill_tries_lost": self._prefill_tries_lost,
                "prefill_failures": self._prefill_failures}

    async def _pd_handle_request(self, request, raw_request_info=None):
        """Remote prefill, then local decode (upstream's sequential handoff), with prefill faults handled: see
        the module docstring. Connectors with peer binding or concurrent handoff keep upstream's flow."""
        backend = self._get_connector_backend()
        if backend.requires_peer_binding or backend.concurrent_handoff:
            async for chunk in super()._pd_handle_request(request, raw_request_info):
                yield chunk
            return
        method = "chat" if isinstance(request, ChatCompletionRequest) else "completions"
        prefill = getattr(self._prefill_handle_for(raw_request_info), method)
        why = "no attempt made"
        for attempt in range(self._prefill_attempts):
            if attempt:
                await asyncio.sleep(_RETRY_BACKOFF_S * attempt)
            prefill_request = backend.prepare_prefill_request(request=request, peer=None)
            self._request_prefill_token_ids(prefill_request)
            try:
                prefill_chunk = await prefill.remote(prefill_request, raw_request_info).__anext__()
            except _PREFILL_GONE as exc:
                why = f"the prefill replica was lost ({type(exc).__name__})"
                self._prefill_tries_lost += 1
                logger.warning("prefill attempt %d/%d: %s", attempt + 1, self._prefill_attempts, why)
                continue
            if isinstance(prefill_chunk, ErrorResponse):
                logger.error("prefill returned an error: %s", prefill_chunk)
                yield prefill_chunk
                return
            decode_request = backend.prepare_decode_request(request=request, peer=None, prefill_response=prefill_chunk)
            decode_request.kv_transfer_params, holder = _without_holder(decode_request.kv_transfer_params)
            try:
                with reuse_prompt_token_ids(self._decode_reuse_ids(prefill_chunk)):
                    async with contextlib.aclosing(self._decode_while_kv_holder_lives(
                            method, decode_request, raw_request_info, holder)) as stream:
                        async for chunk in stream:
                            yield chunk
                return
            except _PrefillLost as exc:
                why = str(exc)
                self._prefill_tries_lost += 1
                logger.warning("prefill attempt %d/%d: %s", attempt + 1, self._prefill_attempts, why)
        self._prefill_failures += 1
        yield ErrorResponse(error=ErrorInfo(
            message=f"prefill failed {self._prefill_attempts} time(s); last: {why}", type="ServiceUnavailable",
            code=503))

    def _prefill_handle_for(self, raw_request_info):
        """The prefill handle with the request's LoRA model and session affinity (as upstream)."""
        handle = self._prefill_handle
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            handle = handle.options(multiplexed_model_id=model_id)
        session_id = session_id_from_headers(raw_request_info.headers) if raw_request_info is not None else None
        return handle.options(session_id=session_id) if session_id else handle

    async def _decode_while_kv_holder_lives(self, method: str, request, raw_request_info,
                                            holder: list[str] | None) -> AsyncGenerator:
        """Local decode; until its first output (the KV has arrived by then) the prefill replica holding the KV
        must live, else the local request is aborted and `_PrefillLost` raised (nothing was yielded yet)."""
        local = await getattr(LLMServer, method)(self, request, raw_request_info)
        first = asyncio.ensure_future(local.__anext__())
        try:
            while holder is not None and not first.done():
                if not await self._alive(holder):
                    raise _PrefillLost(f"prefill replica {holder[1]} died before its KV reached the decode engine")
                await asyncio.wait({first}, timeout=self._probe_interval_s)
            try:
                chunk = await first
            except StopAsyncIteration:
                return
            if isinstance(chunk, ErrorResponse) and holder is not None and not await self._alive(holder):
                raise _PrefillLost(f"the KV pull from dead prefill replica {holder[1]} failed: {chunk.error.message}")
            yield chunk
            async for chunk in local:
                yield chunk
        finally:
            if not first.done():  # abort the engine request: vLLM aborts on cancellation and frees its blocks
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            with contextlib.suppress(BaseException):
                await local.aclose()

    async def _alive(self, holder: list[str]) -> bool:
        """Whether the prefill replica lives; one lookup per replica per probe interval, shared by all waiters."""
        key, now = (holder[0], holder[1]), time.monotonic()
        cached = self._liveness.get(key)
        if cached is None or now - cached[0] >= self._probe_interval_s:
            self._liveness = {k: v for k, v in self._liveness.items() if now - v[0] < 60.0}
            cached = (now, asyncio.ensure_future(asyncio.to_thread(_actor_alive, *key)))
            self._liveness[key] = cached
        return await asyncio.shield(cached[1])

    async def local_completions(self, request):
        """Run a completion on this engine only (no remote prefill); returns the non-streamed response."""
        gen = await LLMServer.completions(self, request)
        last = None
        async for chunk in gen:
            last = chunk
        return last

    async def decode_with_kv_from(self, request):
        """Diagnostics and fault tests: decode `request` locally with the `kv_transfer_params` it carries (a
        prefill answer's, holder included) under the same liveness watch as served requests. Returns the
        non-streamed response, or the `_PrefillLost` message as an error response."""
        params, holder = _without_holder(request.kv_transfer_params)
        request = request.model_copy(update={"kv_transfer_params": params})
        last = None
        try:
            async with contextlib.aclosing(self._decode_while_kv_holder_lives(
                    "completions", request, None, holder)) as stream:
                async for chunk in stream:
                    last = chunk
        except _PrefillLost as exc:
            return ErrorResponse(error=ErrorInfo(message=str(exc), type="ServiceUnavailable", code=503))
        return last
