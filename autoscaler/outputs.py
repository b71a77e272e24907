"""The controller's outputs besides its state: the Prometheus metrics of each tick (from the typed observation
and decision) and the JSONL decision log (bounded by rotation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from autoscaler.model import ServiceDecision, ServiceObservation


def append_decision(path: str, entry: dict, max_mb: float) -> None:
    """Append one row to the JSONL decision log; past `max_mb` it rotates to `<path>.1` first (the previous
    `.1` is dropped: at most twice `max_mb` on disk)."""
    log = Path(path)
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists() and log.stat().st_size >= max_mb * 1e6:
        log.replace(log.with_name(log.name + ".1"))
    with log.open("a") as f:
        f.write(json.dumps(entry) + "\n")


class ControllerMetrics:
    """Prometheus metrics of the controller (labels: service, role, state, action, reason, stage: bounded)."""

    def __init__(self, service: str, gpus_per_replica: dict[str, int]):
        from ray.util import metrics

        self.service, self.gpus_per_replica = service, gpus_per_replica
        self.replicas = metrics.Gauge("heteroscale_controller_replicas", "replicas per role and state",
                                      tag_keys=("service", "role", "state"))
        self.gpus = metrics.Gauge("heteroscale_controller_allocated_gpus", "GPUs held per role (ready, starting "
                                  "and withdrawn replicas x GPUs per replica): integrate for GPU-hours",
                                  tag_keys=("service", "role"))
        self.decode_tps = metrics.Gauge("heteroscale_controller_decode_tokens_per_second",
                                        "observed decode tokens/s (unset when missing)", tag_keys=("service",))
        self.target_tps = metrics.Gauge("heteroscale_controller_target_decode_tokens_per_second",
                                        "target decode tokens/s of the current decode target", tag_keys=("service",))
        self.ratio = metrics.Gauge("heteroscale_controller_prefill_per_decode_ratio",
                                   "P:D ratio: in_force (every DG kept in its band) and, with the adaptive "
                                   "ratio, the estimate the workload asks for", tag_keys=("service", "kind"))
        self.prefill_tps = metrics.Gauge("heteroscale_controller_prefill_kv_miss_tokens_per_second",
                                         "observed KV-miss prefill tokens/s (unset when missing)",
                                         tag_keys=("service",))
        self.forecast = metrics.Gauge("heteroscale_controller_forecast_decode_tokens_per_second",
                                      "decode tokens/s forecast one measured start-up ahead, widened by the "
                                      "forecast's error (unset without a forecast)", tag_keys=("service",))
        self.decisions = metrics.Counter("heteroscale_controller_decisions_total", "decisions by action and reason",
                                         tag_keys=("service", "action", "reason"))
        self.errors = metrics.Counter("heteroscale_controller_tick_errors_total", "failed ticks by stage",
                                      tag_keys=("service", "stage"))
        self.last_tick = metrics.Gauge("heteroscale_controller_last_tick_timestamp_seconds",
                                       "when the last tick completed (Unix s): time() minus this grows while the "
                                       "loop is stuck", tag_keys=("service",))

    def export(self, now_s: float, obs: ServiceObservation, dec: ServiceDecision, tps_per_instance: float,
               ratio_in_force: float) -> None:
        """One tick's gauges from the typed observation and decision (not from the decision-log row)."""
        tags = {"service": self.service}
        for role, counts, target in (("prefill", obs.prefill, dec.target_prefill),
                                     ("decode", obs.decode, dec.target_decode)):
            states = {s: getattr(counts, s) for s in ("ready", "pending", "withdrawn", "stuck")}
            for state, n in states.items():
                self.replicas.set(n, tags={**tags, "role": role, "state": state})
            self.replicas.set(target, tags={**tags, "role": role, "state": "target"})
            self.gpus.set(sum(states.values()) * self.gpus_per_replica[role], tags={**tags, "role": role})
        tps = obs.decode_tps.value
        if tps is not None and math.isfinite(tps):
            self.decode_tps.set(tps, tags=tags)
        self.target_tps.set(dec.target_decode * tps_per_instance, tags=tags)
        self.ratio.set(ratio_in_force, tags={**tags, "kind": "in_force"})
        if dec.diagnostics.ratio_estimate is not None:
            self.ratio.set(dec.diagnostics.ratio_estimate, tags={**tags, "kind": "estimate"})
        if dec.diagnostics.forecast_decode_tps is not None:
            self.forecast.set(dec.diagnostics.forecast_decode_tps, tags=tags)
        prefill_tps = obs.prefill_kv_miss_tps.value
        if prefill_tps is not None and math.isfinite(prefill_tps):
            self.prefill_tps.set(prefill_tps, tags=tags)
        self.decisions.inc(1, tags={**tags, "action": dec.action.value, "reason": dec.reason.value})
        self.last_tick.set(now_s, tags=tags)

    def error(self, stage: str) -> None:
        self.errors.inc(1, tags={"service": self.service, "stage": stage})


class FleetMetrics:
    """Prometheus metrics of a fleet's controller (labels: fleet, gpu_type, service, kind: bounded by the fleet
    file and the cluster's GPU types)."""

    def __init__(self, fleet: str):
        from ray.util import metrics

        self.fleet = fleet
        self.used = metrics.Gauge("heteroscale_fleet_used_gpus", "GPUs the fleet's groups hold, per GPU type",
                                  tag_keys=("fleet", "gpu_type"))
        self.budget = metrics.Gauge("heteroscale_fleet_budget_gpus", "the fleet's GPU budget per GPU type "
                                    "(gpu_type 'total' for the whole fleet)", tag_keys=("fleet", "gpu_type"))
        self.priority = metrics.Gauge("heteroscale_fleet_service_priority", "each service's priority",
                                      tag_keys=("fleet", "service"))
        self.preemptions = metrics.Counter("heteroscale_fleet_preemptions_total", "capacity a service gave up to a "
                                           "higher priority: kind group (a whole group for room) or budget (a cut)",
                                           tag_keys=("fleet", "service", "kind"))

    def export(self, summary: dict, preempted: list[dict]) -> None:
        tags = {"fleet": self.fleet}
        budget = summary["budget"]
        for gpu_type, n in budget["used_by_type"].items():
            self.used.set(n, tags={**tags, "gpu_type": gpu_type})
        for gpu_type, cap in budget["by_type"].items():
            self.budget.set(cap, tags={**tags, "gpu_type": gpu_type})
        if budget["total"] is not None:
            self.budget.set(budget["total"], tags={**tags, "gpu_type": "total"})
        for name, svc in summary["services"].items():
            self.priority.set(svc["priority"], tags={**tags, "service": name})
        for p in preempted:
            self.preemptions.inc(1, tags={**tags, "service": p["service"], "kind": p["kind"]})
