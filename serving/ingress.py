"""OpenAI-compatible ingress that balances requests across deployment groups.

Builds on Ray Serve LLM's `OpenAiIngress` (request models, validation-error handling, SSE framing) and adds:
choice of deployment group (DG) per request, weighted by the controller's routing weights (each DG's scarcer
routable role, in decode replicas: `common.wire.routing_weights`; least in-flight per weight; round-robin on
ties; a DG of weight 0 gets nothing new while another has weight, and when none has, all share alike), a
withdraw/restore switch per DG,
configurable timeouts (whole request, or first token plus idle gap when streaming), an optional API key,
`GET /health`, `GET /metrics` (Prometheus text) and `GET /v1/heteroscale/stats` (what each DG served). Each
DG's decode deployment (its own Serve application) drives its own DG's prefill.

With a controller, the ingress reports every `report_interval_s`: per-DG TTFT histograms as clients see them
(request arrival to first streamed chunk: queueing, remote prefill and the KV pull included; non-streaming
requests are asked of the engines as streams and answered whole, `serving.aggregate`) and in-flight
counts; the answer is the routing table (DGs, their applications and weights), so DGs the controller adds or
removes are discovered at run time. While the controller cannot be reached the last table stands.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import time
import uuid
from typing import Any, Mapping

from fastapi import HTTPException, Request, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response, StreamingResponse

from common import histogram
from common.wire import IngressReport, RoutingEntry, WireError
from serving.aggregate import as_stream, assemble, chunks_of, collect, unmeasured_reason
from serving.openai_http import body_error, error, with_idle_timeout
from serving.ray_llm import (NON_STREAMING_RESPONSE_TYPES, ChatCompletionRequest, CompletionRequest, ErrorResponse,
                             OpenAiIngress, OpenAIHTTPException, RawRequestInfo, init, make_fastapi_ingress,
                             openai_json_wrapper, peek_at_generator, sanitize_chat_completion_request)
from serving.reporting import report_forever

logger = logging.getLogger(__name__)

_REGISTRY = CollectorRegistry()
_REQUESTS = Counter("heteroscale_ingress_requests", "requests by route and outcome", ("route", "outcome"),
                    registry=_REGISTRY)
_LATENCY = Histogram("heteroscale_ingress_latency_seconds", "time to the response head (first chunk when "
                     "streaming)", ("route",), registry=_REGISTRY,
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
_INFLIGHT = Gauge("heteroscale_ingress_inflight", "requests in flight per deployment group",
                  ("service", "deployment_group"), registry=_REGISTRY)
_ROUTED = Counter("heteroscale_ingress_routed", "requests routed per deployment group", ("service", "deployment_group"),
                  registry=_REGISTRY)
_SHED = Counter("heteroscale_ingress_shed", "requests refused by admission control (429): demand the engines never "
                "saw", ("service",), registry=_REGISTRY)
_TTFT = Histogram("heteroscale_ingress_ttft_seconds", "request arrival to first streamed chunk, per deployment "
                  "group", ("service", "deployment_group"), registry=_REGISTRY,
                  buckets=histogram.BOUNDS_S)  # the pushed histogram's buckets: both signal sources agree
_UNMEASURED = Counter("heteroscale_ingress_ttft_unmeasured", "non-streaming requests served whole, so without a "
                      "TTFT (serving.aggregate): why", ("service", "reason"), registry=_REGISTRY)


_OPEN_PATHS = ("/health", "/metrics")
_API_KEY: dict[str, str | None] = {"value": None}  # set by the replica's __init__; read by the middleware

app = init()


_BODY_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
_ROUTES = frozenset((*_BODY_MODELS, "/v1/models", *_OPEN_PATHS))


def _route(path: str) -> str:
    """A metric label for a request path: the served routes by name, anything else "other" (paths come from
    clients, unauthenticated ones too: they must not grow the label set)."""
    return path if path in _ROUTES else "other"


@app.middleware("http")
async def _validate_body(request: Request, call_next):
    """(Added before the API-key check, so that check runs first: middleware runs last-added first.)

    Refuse a bad request body with an OpenAI-style 4xx before FastAPI and the request models see it.

    The request models (vLLM's, through ray.llm) run validators that assume the declared shape, so a null where
    a list belongs raised TypeError inside a validator -- a 500; a body in another media type was another. Every
    body of the two inference routes is parsed and validated here once: not JSON (or not a JSON object) -> 400,
    a media type other than JSON -> 415, any validation failure, whatever its exception -> 400 naming the field.
    """
    model = _BODY_MODELS.get(request.url.path)
    if model is None or request.method != "POST":
        return await call_next(request)
    refused = await body_error(request, model)
    if refused is not None:
        _REQUESTS.labels(_route(request.url.path), f"http_{refused.status_code}").inc()
        return refused
    return await call_next(request)


@app.middleware("http")
async def _require_api_key(request: Request, call_next):
    key = _API_KEY["value"]
    if key and request.url.path not in _OPEN_PATHS:
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):  # constant time; never logged
            _REQUESTS.labels(_route(request.url.path), "unauthorized").inc()
            return error(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key (send 'Authorization: Bearer "
                          "<key>')", kind="authentication_error")
    return await call_next(request)


@app.exception_handler(HTTPException)
async def _openai_style_http_error(request: Request, exc: HTTPException):
    """FastAPI's HTTPException (e.g. unknown model -> 404) as an OpenAI error object."""
    return error(exc.status_code, str(exc.detail),
                  kind="invalid_request_error" if exc.status_code < 500 else "server_error")


class _Timeout(Exception):
    pass


class _Overloaded(Exception):
    """Every admitted DG holds its in-flight bound: shed the request (429 + Retry-After)."""


class _NoGroup(Exception):
    """No DG is admitted to routing (the service is scaled to zero, e.g. preempted by a higher priority): refuse
    the request at once (503 + Retry-After), never hold it."""


class PDIngress(OpenAiIngress):
    """One model, several deployment groups (each a decode deployment that drives its own prefill)."""

    def __init__(self, groups: Mapping[str, RoutingEntry], model_card: dict, *, request_timeout_s: float,
                 stream_idle_timeout_s: float, max_inflight_per_decode_replica: int | None = None,
                 retry_after_s: float = 1.0, api_key: str | None = None, controller: str | None = None,
                 report_interval_s: float = 1.0, handles: Mapping[str, DeploymentHandle] | None = None,
                 service: str = "unknown"):
        from serving.ray_llm import ModelCard

        if not groups:
            raise ValueError("PDIngress needs at least one deployment group")
        card = ModelCard.model_validate(model_card)
        self._model_id = card.id  # `model` is optional in the request models: a request without one gets this
        self._given_handles = dict(handles or {})  # tests inject handles; otherwise looked up by name
        self._service = service  # the `service` label of the per-DG series
        self._entries: dict[str, RoutingEntry] = {}
        self._groups: dict[str, Any] = {}
        self._inflight: dict[str, int] = {}
        self._routed: dict[str, int] = {}
        self._routed_gone = 0  # requests routed to DGs since removed (the admitted total never goes back)
        self._ttft_hist: dict[str, list[int]] = {}
        self._set_table(dict(groups))
        super().__init__(llm_deployments={card.id: next(iter(self._groups.values()))}, model_cards={card.id: card})
        self._withdrawn: set[str] = set()
        self._all_zero_warned = False
        self._tiebreak = itertools.count()
        self._request_timeout_s = request_timeout_s
        self._stream_idle_timeout_s = stream_idle_timeout_s
        if max_inflight_per_decode_replica is not None and max_inflight_per_decode_replica < 1:
            raise ValueError(f"max_inflight_per_decode_replica ({max_inflight_per_decode_replica}) must be >= 1")
        self._max_inflight = max_inflight_per_decode_replica
        self._retry_after_s = retry_after_s
        self._shed = 0  # requests refused for capacity (cumulative; reported: the controller counts them as demand)
        _API_KEY["value"] = api_key
        self._controller_name = controller
        self._report_interval_s = report_interval_s
        self._ingress_id = uuid.uuid4().hex
        self._reporter = None
        self._ensure_reporter()

    def _ensure_reporter(self) -> None:
        """Start the report loop once an event loop runs (the constructor may run outside one)."""
        if self._controller_name is None or self._reporter is not None:
            return
        try:
            self._reporter = asyncio.get_running_loop().create_task(report_forever(
                self._controller_name, "report_ingress", self._report_interval_s, self._ingress_report,
                self._on_answer))
        except RuntimeError:
            pass

    def _handle(self, name: str, entry: RoutingEntry):
        if name in self._given_handles:
            return self._given_handles[name].options(stream=True)
        from ray import serve

        return serve.get_deployment_handle(entry.decode_deployment, entry.app_name).options(stream=True)

    def _set_table(self, table: dict[str, RoutingEntry]) -> None:
        """Adopt a routing table: new DGs get handles, removed ones leave routing (their in-flight finish)."""
        for name, entry in table.items():
            old = self._entries.get(name)
            if old is None or (old.app_name, old.decode_deployment) != (entry.app_name, entry.decode_deployment):
                self._groups[name] = self._handle(name, entry)
            self._inflight.setdefault(name, 0)
            self._routed.setdefault(name, 0)
            self._ttft_hist.setdefault(name, histogram.empty())
        for name in set(self._entries) - set(table):
            self._groups.pop(name, None)
        self._entries = table
        for name in [g for g in self._inflight if g not in table]:
            self._forget(name)

    def _forget(self, name: str) -> None:
        """A DG that left the table, once its in-flight requests ended: its counts, its histogram and its
        Prometheus series go (the admitted total stays monotonic: its routed count moves to `_routed_gone`)."""
        if name in self._entries or self._inflight.get(name, 0) > 0:
            return
        self._routed_gone += self._routed.pop(name, 0)
        self._inflight.pop(name, None)
        self._ttft_hist.pop(name, None)
        for metric in (_INFLIGHT, _ROUTED, _TTFT):
            try:
                metric.remove(self._service, name)
            except KeyError:  # no series was ever made for it
                pass

    def _ingress_report(self) -> dict:
        return IngressReport(self._ingress_id, {g: tuple(c) for g, c in self._ttft_hist.items()},
                             dict(self._inflight), self._routed_gone + sum(self._routed.values()),
                             self._shed).to_wire()

    def _on_answer(self, answer: dict) -> None:
        table = answer.get("groups")
        if table:  # None until the controller has looked at Serve: keep the last table
            try:
                entries = {name: RoutingEntry.from_wire(entry) for name, entry in table.items()}
            except WireError as exc:  # a controller of another version: keep routing on the last table
                logger.error("routing table refused: %s", exc)
                return
            self._set_table(entries)

    # ---- routing across deployment groups ---------------------------------------------------------------------

    def _weights(self) -> dict[str, float]:
        """Routing weight per DG not withdrawn here. When every such DG has weight 0 (the controller sees no
        routable decode replica: e.g. Serve's controller restarting lists its replicas as recovering, or a DG's
        last replica is being replaced), each gets weight 1: a request must go somewhere, and Serve's router
        holds it until a replica can take it (bounded by the request timeout) instead of a 503 here."""
        open_groups = [g for g in self._groups if g not in self._withdrawn and not self._entries[g].closed]
        weights = {g: self._entries[g].weight for g in open_groups if self._entries[g].weight > 0}
        if not weights and open_groups:
            if not self._all_zero_warned:
                logger.warning("no deployment group has a routable decode replica; routing to all of %s",
                               sorted(open_groups))
                self._all_zero_warned = True
            return {g: 1.0 for g in open_groups}
        self._all_zero_warned = False
        return weights

    def _pick_group(self) -> str:
        weights = self._weights()
        if not weights:
            self._shed += 1  # refused demand: the controller counts it like a shed request
            raise _NoGroup()
        admitted = list(weights)
        if self._max_inflight is not None:  # admission control: only DGs below their bound take more
            admitted = [g for g in admitted if self._inflight[g] < self._max_inflight * weights[g]]
            if not admitted:
                self._shed += 1
                raise _Overloaded()
        load = {g: (self._inflight[g] + 1) / weights[g] for g in admitted}
        low = min(load.values())
        candidates = [g for g in admitted if load[g] == low]
        return candidates[next(self._tiebreak) % len(candidates)]

    async def set_withdrawn(self, groups: list[str]) -> list[str]:
        """Stop sending new requests to these groups (in-flight ones finish); others are restored."""
        unknown = sorted(set(groups) - set(self._groups))
        if unknown:
            raise ValueError(f"unknown deployment groups {unknown}; have {sorted(self._groups)}")
        self._withdrawn = set(groups)
        return sorted(self._withdrawn)

    async def routing_stats(self) -> dict:
        return {"inflight": dict(self._inflight), "routed": dict(self._routed), "shed": self._shed,
                "withdrawn": sorted(self._withdrawn),
                "groups": {name: {"app": e.app_name, "weight": e.weight,
                                  "domain": e.group.domain if e.group else None,
                                  "prefill_gpu_type": e.group.prefill_gpu_type if e.group else None,
                                  "decode_gpu_type": e.group.decode_gpu_type if e.group else None}
                           for name, e in sorted(self._entries.items())}}

    async def _get_response(self, *, body, call_method: str, raw_request: Request | None = None):
        if getattr(body, "model", None) is None and hasattr(body, "model_copy"):
            body = body.model_copy(update={"model": self._model_id})  # one model served: it is the default
        await self._get_model_id(body.model)  # 404 for an unknown model
        self._ensure_reporter()
        group = self._pick_group()
        handle = self._groups[group]
        if isinstance(body, ChatCompletionRequest):
            try:
                body = sanitize_chat_completion_request(body)
            except ValueError as exc:  # a message whose content is no string, None or list of parts: the client's
                raise OpenAIHTTPException(status_code=status.HTTP_400_BAD_REQUEST, type="invalid_request_error",
                                          message=str(exc)) from None
        info = RawRequestInfo.from_starlette_request(raw_request) if raw_request is not None else None
        self._inflight[group] += 1
        self._routed[group] += 1
        _INFLIGHT.labels(self._service, group).inc()
        _ROUTED.labels(self._service, group).inc()
        start, first = time.monotonic(), bool(getattr(body, "stream", False))
        try:
            async for response in getattr(handle, call_method).remote(body, info):
                if first:  # streaming: the first chunk is the first token the client sees
                    first = False
                    ttft = time.monotonic() - start
                    histogram.add(self._ttft_hist[group], [ttft])
                    _TTFT.labels(self._service, group).observe(ttft)
                yield response
        finally:
            self._inflight[group] -= 1
            _INFLIGHT.labels(self._service, group).dec()
            if group not in self._entries:  # its DG was removed while this request ran: the last one out
                self._forget(group)

    async def _process_llm_request(self, body, call_method: str, raw_request: Request | None = None) -> Response:
        route = call_method
        start = time.monotonic()
        whole = not getattr(body, "stream", False)  # the client wants one response
        reason = unmeasured_reason(body) if whole else None
        if whole and reason is None:  # asked as a stream, so its first token is seen (serving.aggregate)
            body = as_stream(body)
        elif whole:
            _UNMEASURED.labels(self._service, reason).inc()
        try:
            gen = self._get_response(body=body, call_method=call_method, raw_request=raw_request)
            try:
                first, gen = await asyncio.wait_for(peek_at_generator(gen), self._request_timeout_s)
            except asyncio.TimeoutError:
                raise _Timeout() from None
            first_chunk = first[0] if isinstance(first, list) else first
            if isinstance(first_chunk, ErrorResponse):
                raise OpenAIHTTPException(message=first_chunk.error.message, status_code=first_chunk.error.code,
                                          type=first_chunk.error.type)
            if whole and reason is None:
                left = max(0.0, self._request_timeout_s - (time.monotonic() - start))
                try:
                    items = await asyncio.wait_for(collect(gen), left)
                    content = assemble((c for item in items for c in chunks_of(item)), chat=call_method == "chat")
                except asyncio.TimeoutError:
                    raise _Timeout() from None
                except ValueError as exc:  # an error event mid-stream: the engine failed after the first chunk
                    raise OpenAIHTTPException(status_code=status.HTTP_502_BAD_GATEWAY, type="upstream_error",
                                              message=f"the response failed: {exc}") from None
                _LATENCY.labels(route).observe(time.monotonic() - start)
                _REQUESTS.labels(route, "ok").inc()
                return JSONResponse(content=content)
            _LATENCY.labels(route).observe(time.monotonic() - start)
            if isinstance(first_chunk, NON_STREAMING_RESPONSE_TYPES):
                _REQUESTS.labels(route, "ok").inc()
                return JSONResponse(content=first_chunk.model_dump())
            _REQUESTS.labels(route, "stream").inc()
            stream = with_idle_timeout(openai_json_wrapper(gen), self._stream_idle_timeout_s)
            return StreamingResponse(stream, media_type="text/event-stream")
        except _Overloaded:
            _REQUESTS.labels(route, "shed").inc()
            _SHED.labels(self._service).inc()
            return error(status.HTTP_429_TOO_MANY_REQUESTS,
                          f"over capacity: every deployment group holds its bound of {self._max_inflight} in-flight "
                          f"requests per decode replica; retry after {self._retry_after_s:g} s",
                          kind="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(self._retry_after_s)))})
        except _NoGroup:
            _REQUESTS.labels(route, "unavailable").inc()
            return error(status.HTTP_503_SERVICE_UNAVAILABLE,
                         f"service {self._service!r} has no deployment group serving now (scaled to zero, or its "
                         f"groups are being replaced); retry after {self._retry_after_s:g} s",
                         kind="service_unavailable", headers={"Retry-After": str(max(1, math.ceil(self._retry_after_s)))})
        except _Timeout:
            _REQUESTS.labels(route, "timeout").inc()
            raise OpenAIHTTPException(status_code=status.HTTP_504_GATEWAY_TIMEOUT, type="timeout",
                                      message=f"no response within request_timeout_s={self._request_timeout_s}")
        except OpenAIHTTPException as exc:
            _REQUESTS.labels(route, f"http_{exc.status_code}").inc()
            raise

    # ---- operational endpoints --------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's periodic health check (also starts the report loop before the first request)."""
        self._ensure_reporter()

    async def health(self) -> Response:
        admitted = [g for g in self._groups if g not in self._withdrawn and not self._entries[g].closed]
        code = 200 if admitted else 503
        return JSONResponse(status_code=code, content={"status": "ok" if admitted else "no admitted groups",
                                                        "deployment_groups": sorted(self._groups),
                                                        "withdrawn": sorted(self._withdrawn)})

    async def metrics(self) -> Response:
        return Response(generate_latest(_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def heteroscale_stats(self) -> Response:
        return JSONResponse(content=await self.routing_stats())


ENDPOINTS = {
    "models": lambda a: a.get("/v1/models"),
    "model_data": lambda a: a.get("/v1/models/{model:path}"),
    "completions": lambda a: a.post("/v1/completions"),
    "chat": lambda a: a.post("/v1/chat/completions"),
    "health": lambda a: a.get("/health"),
    "metrics": lambda a: a.get("/metrics"),
    "heteroscale_stats": lambda a: a.get("/v1/heteroscale/stats"),
}

PDIngressDeployment = make_fastapi_ingress(PDIngress, endpoint_map=ENDPOINTS, app=app)
