"""The HeteroScale controller: one named, detached Ray actor per service that scales both pools together.

Every `control_period_s`: `autoscaler.port.step(RayWorld, ...)` (observe -> the shared pure cycle -> apply),
in a worker thread so that reports keep arriving on the actor's event loop. Errors are caught at the loop
boundary, logged with context and counted by stage; a failed tick never kills the actor. After each tick the
policy state and the DG records are saved in Ray's internal KV, so a restarted actor (Ray restarts it) resumes
where it was: the same targets, cooldowns and soft scale-in in progress, and no burst of actions (actions are
absolute and level-triggered; with no fresh signals yet the policy holds). Decisions go to an in-memory log
(`decisions()`), optionally a JSONL file, and Prometheus metrics with bounded labels (`ray_heteroscale_controller_*`).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

from autoscaler import persistence
from autoscaler.cycle import CycleConfig
from autoscaler.model import FleetConfig, PolicyState
from autoscaler.outputs import ControllerMetrics, append_decision
from autoscaler.ratio import current_ratio
from autoscaler.port import decision_entry, step
from autoscaler.ray_world import GroupRecord, RayWorld, service_shape
from autoscaler.serve_client import RayKV
from autoscaler.settings import controller_settings, policy_config
from autoscaler.signals import IngressReport, ReplicaReport
from autoscaler.supply import plan_supply
from common import wire
from common.config import ServiceSpec
from common.vocab import DeploymentGroup, Role

logger = logging.getLogger(__name__)

MAX_DECISIONS = 1000


@dataclass
class Persisted:
    policy: PolicyState = field(default_factory=PolicyState)
    records: dict[str, GroupRecord] = field(default_factory=dict)
    ticks: int = 0


class HeteroScaleController:
    """The actor class (wrapped with `ray.remote` by `autoscaler.lifecycle.start()`)."""

    def __init__(self, spec: ServiceSpec, model_path: str, groups: list[tuple[DeploymentGroup, int]],
                 clock=time.time, serve=None, kv=None, metrics=None, autostart: bool = True,
                 deployer: str | None = None, fleet: str | None = None):
        self.spec = spec
        # In a fleet (`autoscaler.fleet_controller`) the fleet's controller decides and places every service in
        # one cycle; this actor keeps its service's world (reports, routing, Serve) and runs no loop of its own.
        self.fleet = fleet
        self.settings = controller_settings(spec)
        self.config = self.cycle_config(spec)
        self._clock = clock
        self._kv = kv if kv is not None else RayKV()
        saved = self._load()
        records = saved.records if saved else {g.name: GroupRecord(g, slot) for g, slot in groups}
        self.state = saved.policy if saved else PolicyState()
        self.ticks = saved.ticks if saved else 0
        self.resumed = saved is not None
        self.world = RayWorld(spec, self.settings, model_path, records, serve=serve, advisory=self.settings.advisory,
                              kv=self._kv, deployer=deployer)
        self.world.ratio_in_force = self._ratio()  # a resumed adaptive ratio gates from the first tick
        self.errors: Counter[str] = Counter()
        self.decisions: deque[dict] = deque(maxlen=MAX_DECISIONS)
        # (now_s, observation, cluster view, actions) of recent ticks: the parity replay's input
        self.recorded: deque[tuple] = deque(maxlen=MAX_DECISIONS)
        self._tick_lock = threading.Lock()
        # the decision log, the parity records and the error counts are written by the tick thread and the
        # event loop (reports) and read on the event loop (status): one short lock around each touch
        self._log_lock = threading.Lock()
        self._metrics = metrics if metrics is not None else ControllerMetrics(
            spec.name, {"prefill": spec.roles.prefill.gpus_per_replica, "decode": spec.roles.decode.gpus_per_replica})
        self._stop = threading.Event()
        # The loop runs in a thread started here, so a controller that Ray restarts resumes by itself.
        self._thread = threading.Thread(target=self._run, name="heteroscale-control-loop", daemon=True)
        if autostart and fleet is None:
            self._thread.start()
        logger.info("controller for %s %s (%d DGs)%s", spec.name, "resumed" if self.resumed else "started",
                    len(records), f", in fleet {fleet}" if fleet else "")

    @staticmethod
    def cycle_config(spec: ServiceSpec) -> CycleConfig:
        return CycleConfig(FleetConfig(services={spec.name: policy_config(spec)}), {spec.name: service_shape(spec)})

    # ---- loop ----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        period = self.settings.control_period_s
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    async def ping(self) -> dict:
        return {"service": self.spec.name, "ticks": self.ticks, "resumed": self.resumed}

    def tick(self) -> dict | None:
        """One control period; never raises (errors are counted by stage)."""
        with self._tick_lock:
            now = self._clock()
            try:
                result, self.state, observation, view = step(self.world, self.state, now, self.config)
            except Exception as exc:
                self._fail("step", exc)
                return None
            return self._after(now, result, observation, view)

    def _after(self, now: float, result, observation, view) -> dict | None:
        """What follows a step: record it, ask for nodes, log the decision, export metrics, save the state."""
        entry = None
        self.world.ratio_in_force = self._ratio()
        with self._log_lock:
            self.recorded.append((now, observation, view, result.actions, result.failed))
        if result.failed:  # the state already holds what happened; the next cycle re-plans the rest
            self._count("apply", len(result.failed))
            self._metrics.error("apply")
        supply = None
        if self.settings.node_supply and not self.settings.advisory:
            try:
                supply = plan_supply(self.spec.name, view, result, self.world.shape, self.settings.node_supply,
                                     self.config.scheduler)
                self.world.supply(supply)
            except Exception as exc:
                self._fail("supply", exc)
        try:
            stage = "log"
            note = self.world.last_signals.note if self.world.last_signals else ""
            entry = decision_entry(now, self.spec.name, observation, result, note)
            entry["tick"] = self.ticks
            entry["groups"] = self.world.group_summary()
            if supply is not None and (supply.added or supply.unmet):
                entry["supply"] = supply.summary()
            entry["target_decode_tps_per_instance"] = self.config.fleet.services[self.spec.name] \
                .target_decode_tps_per_instance
            with self._log_lock:
                self.decisions.append(entry)
            self._write_log(entry)
            self._metrics.export(now, observation.services[self.spec.name],
                                 result.decision.services[self.spec.name],
                                 self.config.fleet.services[self.spec.name].target_decode_tps_per_instance,
                                 self.world.ratio_in_force)
            stage = "persist"
            self.ticks += 1
            self._save()
        except Exception as exc:
            self._fail(stage, exc)
        return entry

    # ---- in a fleet: the fleet's controller drives the step (`autoscaler.fleet_controller.FleetWorld`) -----------

    def _fleet_prepare(self, now_s: float) -> tuple:
        """Reconcile, then this service's observation, its part of the cluster view and the nodes."""
        self.world.reconcile(now_s)
        observation = self.world.observe(now_s).services[self.spec.name]
        groups, reserve = self.world.view_parts()
        return observation, groups, reserve, tuple(self.world.serve.nodes())

    def _fleet_record(self, now_s: float, result, observation, view, state) -> dict | None:
        """The fleet's step for this service (`result` holds only its part): the state the fleet holds for it,
        then the decision log, metrics and saved state as after a step of its own."""
        with self._tick_lock:
            self.state = PolicyState(services={self.spec.name: state} if state is not None else {})
            return self._after(now_s, result, observation, view)

    async def fleet_prepare(self, now_s: float) -> tuple:
        return await asyncio.to_thread(self._fleet_prepare, now_s)

    async def fleet_apply(self, now_s: float, actions: list) -> list:
        return await asyncio.to_thread(self.world.apply, actions, now_s)

    async def fleet_record(self, now_s: float, result, observation, view, state) -> dict | None:
        return await asyncio.to_thread(self._fleet_record, now_s, result, observation, view, state)

    def _fail(self, stage: str, exc: Exception) -> None:
        n = self._count(stage)
        logger.exception("controller tick failed at %s (%d errors there so far): %s", stage, n, exc)
        self._metrics.error(stage)

    def _count(self, stage: str, n: int = 1) -> int:
        with self._log_lock:
            self.errors[stage] += n
            return self.errors[stage]

    def _errors(self) -> dict[str, int]:
        with self._log_lock:
            return dict(self.errors)

    def _decisions(self) -> list[dict]:
        with self._log_lock:
            return list(self.decisions)

    # ---- reports from replicas and the ingress ----------------------------------------------------------------

    async def report_replica(self, payload: dict) -> dict:
        try:
            msg = wire.ReplicaReport.from_wire(payload)
            role = Role(msg.role)
            report = ReplicaReport(msg.replica_id, msg.group, role, self._clock(), msg.generation_tokens,
                                   msg.prompt_computed_tokens, msg.num_running, msg.num_waiting, msg.kv_cache_usage,
                                   msg.tbt_hist, msg.ttft_hist)
        except (KeyError, ValueError, TypeError) as exc:
            self._count("bad_report")
            raise ValueError(f"bad replica report ({exc})") from None
        with self.world.lock:
            self.world.store.add_replica(report)
        return {"routable": self.world.routable(report.group, role, report.replica_id)}

    async def report_ingress(self, payload: dict) -> dict:
        try:
            msg = wire.IngressReport.from_wire(payload)
            report = IngressReport(msg.ingress_id, self._clock(), msg.ttft_hist, msg.inflight, msg.admitted, msg.shed)
        except (KeyError, ValueError, TypeError) as exc:
            self._count("bad_report")
            raise ValueError(f"bad ingress report ({exc})") from None
        with self.world.lock:
            self.world.store.add_ingress(report)
        return {"groups": self.world.routing_table()}

    # ---- inspection ----------------------------------------------------------------------------------------------

    def _ratio(self) -> float:
        """The P:D ratio in force (the adaptive one the policy's state holds, else the configured one)."""
        return current_ratio(self.config.fleet.services[self.spec.name], self.state.services.get(self.spec.name))

    def _forecast_status(self, svc) -> dict | None:
        """The forecast as the last decision saw it (None when the service has no forecast configured)."""
        if self.config.fleet.services[self.spec.name].forecast_period_s is None:
            return None
        with self._log_lock:
            last = self.decisions[-1] if self.decisions else {}
        profile = svc.profile if svc else None
        return {"decode_tps": last.get("diagnostics", {}).get("forecast_decode_tps"),
                "error": profile.error if profile else None, "startup_s": self.world.measured_startup(),
                "history_bins": sum(v is not None for v in profile.prev) if profile else 0}

    async def status(self) -> dict:
        groups = self.world.group_summary()
        svc = self.state.services.get(self.spec.name)
        return {"service": self.spec.name, "advisory": self.settings.advisory, "ticks": self.ticks,
                "resumed": self.resumed, "control_period_s": self.settings.control_period_s,
                "target_prefill": svc.target_prefill if svc else None,
                "target_decode": svc.target_decode if svc else None,
                "soft_scale_in": asdict(svc.soft) if svc and svc.soft else None,
                "prefill_per_decode": self._ratio(), "ratio_estimate": svc.ratio_estimate if svc else None,
                "forecast": self._forecast_status(svc),
                "adaptive_ratio": self.config.fleet.services[self.spec.name].adaptive_ratio,
                "groups": groups, "errors": self._errors(), "probe_failures": self.world.probe_failures,
                "last_decisions": self._decisions()[-10:]}

    async def decision_log(self, since_tick: int = 0) -> list[dict]:
        return [d for d in self._decisions() if d.get("tick", 0) >= since_tick]

    async def recorded_cycles(self) -> bytes:
        """What the recent ticks observed and did, pickled: (now_s, Observation, ClusterView, actions, failed
        actions) each."""
        with self._log_lock:
            recorded = list(self.recorded)
        return pickle.dumps(recorded)

    async def tick_now(self) -> dict | None:
        """One extra tick now (tests, `heteroscale status --tick`)."""
        return await asyncio.to_thread(self.tick)

    # ---- persistence and the decision log file ---------------------------------------------------------------

    def _load(self) -> Persisted | None:
        """The saved state (versioned JSON, `autoscaler.persistence`); an unreadable one is logged and the
        controller starts from what it sees (the policy is seeded from the groups, never below them)."""
        raw = self._kv.get(persistence.state_key(self.spec.name))
        if not raw:
            return None
        try:
            return Persisted(*persistence.decode(raw, GroupRecord))
        except persistence.StateError as exc:
            logger.error("ignoring the saved controller state of %s: %s", self.spec.name, exc)
            return None

    def _save(self) -> None:
        with self.world.lock:
            blob = persistence.encode(self.state, dict(self.world.records), self.ticks)
        self._kv.put(persistence.state_key(self.spec.name), blob)

    def _write_log(self, entry: dict) -> None:
        if self.settings.decision_log:
            append_decision(self.settings.decision_log, entry, self.settings.decision_log_max_mb)
