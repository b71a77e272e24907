"""The messages the serving layer and the controller exchange, typed and versioned in the shared leaf (they were
dicts built in one module and parsed in another). Each has `to_wire()` (a plain dict with `"v"`, what crosses a
Ray call or sits in an engine's config) and `from_wire()` (which refuses another version, a missing field or a
value of the wrong type with a `WireError` naming it).

- `ReplicaReport`: an engine replica's cumulative counters (`serving.engines` -> `controller.report_replica`);
- `IngressReport`: the ingress's cumulative per-DG counts (`serving.ingress` -> `controller.report_ingress`);
- `RoutingEntry`: one DG of the routing table the controller answers the ingress with (`routing_weights`: its
  weight, one rule for the live table and the simulated ingress);
- `EngineOptions`: what an engine replica needs from the deployment (`serving.app` puts it under one key,
  `heteroscale`, of Ray Serve LLM's `experimental_configs`; `serving.engines` reads it).
Pure: stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from common.vocab import DeploymentGroup

WIRE_VERSION = 1
ENGINE_OPTIONS_KEY = "heteroscale"  # the key of `EngineOptions` in an LLMConfig's experimental_configs


class WireError(ValueError):
    """A message this side cannot read: another version, a missing field, a bad value."""


def _check_version(kind: str, data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise WireError(f"{kind}: expected a mapping, got {type(data).__name__}")
    if data.get("v") != WIRE_VERSION:
        raise WireError(f"{kind}: version {data.get('v')!r}; this side reads {WIRE_VERSION}")
    return data


def _get(kind: str, data: Mapping[str, Any], name: str, kind_of, default=...):
    if name not in data:
        if default is ...:
            raise WireError(f"{kind}: missing field {name!r}")
        return default
    value = data[name]
    try:
        if kind_of is float:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError("not finite")
            return out
        if kind_of is int:
            if isinstance(value, bool) or int(value) != value:
                raise ValueError("not an integer")
            return int(value)
        if kind_of is str:
            if not isinstance(value, str):
                raise ValueError("not a string")
            return value
        return kind_of(value)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{kind}: field {name!r} = {value!r}: {exc}") from None


def _counts(kind: str, name: str, value: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        raise WireError(f"{kind}: field {name!r} is not a list of counts") from None
    if any(x < 0 for x in out):
        raise WireError(f"{kind}: field {name!r} has a negative count")
    return out


@dataclass(frozen=True)
class ReplicaReport:
    replica_id: str
    group: str
    role: str  # "prefill" | "decode"
    generation_tokens: int
    prompt_computed_tokens: int
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    tbt_hist: tuple[int, ...] = ()
    ttft_hist: tuple[int, ...] = ()  # engine-local: reported, not used by the policy
    gpu_utilization: float | None = None
    sm_activity: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, **asdict(self), "tbt_hist": list(self.tbt_hist), "ttft_hist": list(self.ttft_hist)}

    @classmethod
    def from_wire(cls, data: Any) -> ReplicaReport:
        k = "replica report"
        d = _check_version(k, data)
        role = _get(k, d, "role", str)
        if role not in ("prefill", "decode"):
            raise WireError(f"{k}: field 'role' = {role!r}: not prefill or decode")
        return cls(_get(k, d, "replica_id", str), _get(k, d, "group", str), role,
                   _get(k, d, "generation_tokens", int), _get(k, d, "prompt_computed_tokens", int),
                   _get(k, d, "num_running", int, 0), _get(k, d, "num_waiting", int, 0),
                   _get(k, d, "kv_cache_usage", float, 0.0), _counts(k, "tbt_hist", d.get("tbt_hist") or ()),
                   _counts(k, "ttft_hist", d.get("ttft_hist") or ()),
                   None if d.get("gpu_utilization") is None else _get(k, d, "gpu_utilization", float),
                   None if d.get("sm_activity") is None else _get(k, d, "sm_activity", float))


@dataclass(frozen=True)
class IngressReport:
    ingress_id: str
    ttft_hist: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # DG -> cumulative counts
    inflight: Mapping[str, int] = field(default_factory=dict)
    admitted: int = 0  # requests routed to a DG (cumulative)
    shed: int = 0  # requests refused by admission control (cumulative)

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "ingress_id": self.ingress_id, "admitted": self.admitted, "shed": self.shed,
                "inflight": dict(self.inflight), "ttft_hist": {g: list(c) for g, c in self.ttft_hist.items()}}

    @classmethod
    def from_wire(cls, data: Any) -> IngressReport:
        k = "ingress report"
        d = _check_version(k, data)
        hists, inflight = d.get("ttft_hist") or {}, d.get("inflight") or {}
        if not isinstance(hists, Mapping) or not isinstance(inflight, Mapping):
            raise WireError(f"{k}: 'ttft_hist' and 'inflight' must be mappings by deployment group")
        return cls(_get(k, d, "ingress_id", str), {str(g): _counts(k, f"ttft_hist.{g}", c) for g, c in hists.items()},
                   {str(g): _get(k, inflight, g, int) for g in inflight},
                   _get(k, d, "admitted", int, 0), _get(k, d, "shed", int, 0))


def routing_weights(routable: Sequence[tuple[int, int]]) -> list[float]:
    """Each DG's routing weight, in decode replicas, from its routable (prefill, decode) replica counts: the
    service's routable decode split in proportion to the smaller of the DG's share of the routable decode and of
    the routable prefill. KV never leaves a DG, so a group serves at its scarcer role's rate: weighting by decode
    alone sent a group with little prefill its decode's share of requests, and 94 % of the simulated TTFT misses
    came from such groups (docs/design.md, issue 22). One DG, or DGs at one P:D, get their decode counts; a DG
    without routable prefill or decode gets 0. With no routable prefill anywhere the weights are the decode
    counts (nothing to weigh by). The live routing table and the simulated ingress both use this."""
    decode = sum(d for _, d in routable)
    prefill = sum(p for p, _ in routable)
    shares = [min(d / decode, p / prefill) for p, d in routable] if decode and prefill else []
    total = sum(shares)
    if not total:
        return [float(d) for _, d in routable]
    return [decode * share / total for share in shares]


@dataclass(frozen=True)
class RoutingEntry:
    """Where one DG's requests go: its Serve application and decode deployment, and its routing weight (in
    decode replicas, `routing_weights`; 0 = no new requests)."""

    app_name: str
    decode_deployment: str
    weight: float
    group: DeploymentGroup | None = None
    # the controller withdrew the whole DG (a preemption, a scale-in of a whole group), or the DG is new and none of
    # its decode replicas has run yet (a start-up takes minutes): no request goes there, not even when no other DG
    # can take it (then the ingress refuses it at once: 503 + Retry-After, instead of holding it past its timeout)
    withdrawn: bool = False
    starting: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "app_name": self.app_name, "decode_deployment": self.decode_deployment,
                "weight": self.weight, "group": asdict(self.group) if self.group else None,
                "withdrawn": self.withdrawn, "starting": self.starting}

    @property
    def closed(self) -> bool:
        return self.withdrawn or self.starting

    @classmethod
    def from_wire(cls, data: Any) -> RoutingEntry:
        k = "routing entry"
        d = _check_version(k, data)
        weight = _get(k, d, "weight", float)
        if weight < 0:
            raise WireError(f"{k}: field 'weight' = {weight}: negative")
        group = d.get("group")
        try:
            group = DeploymentGroup(**group) if group is not None else None
        except TypeError as exc:
            raise WireError(f"{k}: field 'group': {exc}") from None
        flags = {key: d.get(key, False) for key in ("withdrawn", "starting")}  # absent (an older controller): false
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise WireError(f"{k}: field {key!r} = {value!r}: not a bool")
        return cls(_get(k, d, "app_name", str), _get(k, d, "decode_deployment", str), weight, group, **flags)


@dataclass(frozen=True)
class EngineOptions:
    service: str
    role: str
    group: str
    controller: str | None = None  # the controller actor's name; None: fixed replica counts, always routable
    report_interval_s: float = 1.0
    prefill_attempts: int = 3
    prefill_probe_interval_s: float = 0.5

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, data: Any) -> EngineOptions:
        k = "engine options"
        d = _check_version(k, data)
        controller = d.get("controller")
        if controller is not None and not isinstance(controller, str):
            raise WireError(f"{k}: field 'controller' = {controller!r}: not a string")
        out = cls(_get(k, d, "service", str), _get(k, d, "role", str), _get(k, d, "group", str), controller,
                  _get(k, d, "report_interval_s", float, 1.0), _get(k, d, "prefill_attempts", int, 3),
                  _get(k, d, "prefill_probe_interval_s", float, 0.5))
        if out.report_interval_s <= 0 or out.prefill_attempts < 1 or out.prefill_probe_interval_s <= 0:
            raise WireError(f"{k}: report_interval_s and prefill_probe_interval_s must be > 0 and "
                            f"prefill_attempts >= 1 (got {out})")
        return out
