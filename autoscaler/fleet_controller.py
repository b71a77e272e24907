"""The fleet controller: one actor that decides and places every service of a fleet in one cycle.

Choice (recorded in docs/design.md): per-service controller actors under one arbiter. Each service keeps its
own controller actor (`autoscaler.controller`, in fleet mode): it receives its replicas' and ingress's reports,
answers routing and membership, talks to Serve for its groups, logs its decisions and exports its metrics, as a
lone service's controller does. The fleet controller runs no world of its own: every period it asks each member
for its part (reconcile, observation, groups, GPUs its unplaced replicas will take), joins them into one
cluster view, runs the shared pure cycle (`autoscaler.cycle`: the budget charged in `place()`, priorities,
whole-group preemption, `autoscaler.fleet`) over all services at once, hands each member its actions, then its
part of the result and its policy state. Two services never plan into the same free GPUs (one cycle places
both), and the reports, which arrive many times a second, stay with the service they belong to. The policy
state of the whole fleet (preemptions in progress included) is the fleet controller's, saved in Ray's KV after
every tick; a member keeps its groups' records, so either can restart alone.

`FleetWorld` is `autoscaler.port.World` over the members, so `autoscaler.port.step` drives a fleet exactly as it
drives one service or the simulator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, replace
from typing import Any, Mapping, Protocol, Sequence

from autoscaler import persistence
from autoscaler.cycle import ClusterView, CycleConfig, GroupAction
from autoscaler.fleet import group_gpus
from autoscaler.model import Action, FleetConfig, Observation, PolicyState, Reason
from autoscaler.port import service_part, step
from autoscaler.ray_world import reserved, service_shape
from autoscaler.settings import policy_config
from common.config import FleetSpec

logger = logging.getLogger(__name__)

MAX_PREEMPTIONS = 200


class Member(Protocol):
    """One service's controller as the fleet controller reaches it (a Ray actor handle behind `RayMember`)."""

    def prepare(self, now_s: float) -> tuple: ...  # (ServiceObservation, groups, reservations, nodes)

    def apply(self, now_s: float, actions: list[GroupAction]) -> list[GroupAction]: ...

    def record(self, now_s: float, result, observation: Observation, view: ClusterView, state) -> None: ...


class RayMember:
    """A member controller actor, called with a bounded wait."""

    def __init__(self, handle, timeout_s: float = 60.0):
        self.handle, self.timeout_s = handle, timeout_s

    def prepare(self, now_s):
        import ray

        return ray.get(self.handle.fleet_prepare.remote(now_s), timeout=self.timeout_s)

    def apply(self, now_s, actions):
        import ray

        return ray.get(self.handle.fleet_apply.remote(now_s, actions), timeout=self.timeout_s)

    def record(self, now_s, result, observation, view, state):
        import ray

        return ray.get(self.handle.fleet_record.remote(now_s, result, observation, view, state),
                       timeout=self.timeout_s)


def fleet_config(fleet: FleetSpec) -> CycleConfig:
    """The fleet's cycle configuration: each service's policy with its fleet priority and floor, the budget."""
    policies, shapes = {}, {}
    for m in fleet.members:
        name = m.spec.name
        policies[name] = replace(policy_config(m.spec), priority=m.priority, fleet_min_decode=m.min_decode)
        shapes[name] = replace(service_shape(m.spec), priority=m.priority)
    return CycleConfig(FleetConfig(policies, gpu_budget=fleet.gpu_budget,
                                   gpu_budget_by_type=dict(fleet.gpu_budget_by_type),
                                   preempt_drain_s=fleet.preempt_drain_s), shapes)


class FleetWorld:
    """`autoscaler.port.World` over the members: `reconcile` asks each for its part (it reconciles first), the
    view joins them, `apply` hands each service its actions."""

    def __init__(self, members: Mapping[str, Member]):
        self.members = dict(members)
        self.parts: dict[str, tuple] = {}

    def reconcile(self, now_s: float) -> None:
        self.parts = {name: m.prepare(now_s) for name, m in sorted(self.members.items())}

    def observe(self, now_s: float) -> Observation:
        return Observation({name: part[0] for name, part in self.parts.items()})

    def cluster_view(self, now_s: float) -> ClusterView:
        nodes = next(iter(self.parts.values()))[3] if self.parts else ()
        reserve = [r for part in self.parts.values() for r in part[2]]
        return ClusterView(reserved(nodes, reserve), {name: tuple(part[1]) for name, part in self.parts.items()})

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> list[GroupAction]:
        failed: list[GroupAction] = []
        for name, member in sorted(self.members.items()):
            mine = [a for a in actions if a.service == name]
            if mine:
                failed += member.apply(now_s, mine)
        return failed


def fleet_state_key(fleet: str) -> bytes:
    return f"heteroscale/fleet/{fleet}/controller-state".encode()


class FleetController:
    """The actor class (wrapped with `ray.remote` by `autoscaler.lifecycle.start_fleet()`)."""

    def __init__(self, fleet: FleetSpec, members: Mapping[str, Any], clock=time.time, kv=None,
                 autostart: bool = True, wrap=RayMember, metrics=None):
        from autoscaler.outputs import FleetMetrics
        from autoscaler.serve_client import RayKV

        self.spec = fleet
        self.config = fleet_config(fleet)
        self.world = FleetWorld({name: wrap(m) for name, m in members.items()})
        self._clock = clock
        self._kv = kv if kv is not None else RayKV()
        self.state, self.ticks = self._load()
        self.errors: Counter[str] = Counter()
        self.preemptions: deque[dict] = deque(maxlen=MAX_PREEMPTIONS)
        self.last: dict[str, Any] = {}  # the last tick's view summary (status)
        self._metrics = metrics if metrics is not None else FleetMetrics(fleet.name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heteroscale-fleet-loop", daemon=True)
        if autostart:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, self.spec.control_period_s - (time.monotonic() - started)))

    def tick(self) -> dict | None:
        """One control period for the whole fleet; never raises (errors are counted by stage)."""
        with self._lock:
            now = self._clock()
            try:
                result, self.state, observation, view = step(self.world, self.state, now, self.config)
            except Exception as exc:
                return self._fail("step", exc)
            taken = []
            for p in result.preempted:  # whole groups for a higher priority's placement
                taken.append({"t": round(now, 3), "kind": "group", **asdict(p)})
                logger.info("preempted %s/%s (%dP+%dD) for %s", p.service, p.group, p.num_prefill, p.num_decode,
                            p.for_service)
            for name, dec in sorted(result.decision.services.items()):  # the budget's cuts of what runs
                if dec.reason is Reason.BUDGET_LIMITED and dec.action is Action.SCALE_IN and \
                        (dec.withdraw_prefill or dec.withdraw_decode):
                    higher = sorted(n for n, c in self.config.fleet.services.items()
                                    if c.priority > self.config.fleet.services[name].priority)
                    taken.append({"t": round(now, 3), "kind": "budget", "service": name,
                                  "num_prefill": dec.withdraw_prefill, "num_decode": dec.withdraw_decode,
                                  "for_service": ",".join(higher) or None, "note": dec.diagnostics.note})
                    logger.info("budget cut %s by %dP+%dD (%s)", name, dec.withdraw_prefill, dec.withdraw_decode,
                                dec.diagnostics.note)
            self.preemptions.extend(taken)
            for name, member in sorted(self.world.members.items()):
                try:
                    member.record(now, service_part(result, name), observation, view, self.state.services.get(name))
                except Exception as exc:
                    self._fail(f"record:{name}", exc)
            self.last = self._summary(now, observation, view, result)
            try:
                self._metrics.export(self.last, taken)
            except Exception as exc:
                self._fail("metrics", exc)
            self.ticks += 1
            try:
                self._kv.put(fleet_state_key(self.spec.name), persistence.encode(self.state, {}, self.ticks))
            except Exception as exc:
                self._fail("persist", exc)
            return self.last

    def _fail(self, stage: str, exc: Exception) -> None:
        self.errors[stage] += 1
        logger.exception("fleet %s: tick failed at %s (%d errors there so far): %s", self.spec.name, stage,
                         self.errors[stage], exc)
        return None

    def _summary(self, now: float, observation: Observation, view: ClusterView, result) -> dict:
        """Budget used per GPU type, and each service's priority, demand, targets and groups."""
        used: dict[str, int] = {}
        services = {}
        for m in self.spec.members:
            name = m.spec.name
            shape = self.config.shapes[name]
            for gs in view.groups.get(name, ()):
                for gpu_type, n in group_gpus(gs.group, shape).items():
                    used[gpu_type] = used.get(gpu_type, 0) + n
            st, dec, obs = self.state.services.get(name), result.decision.services.get(name), observation.services[name]
            services[name] = {
                "priority": m.priority, "min_decode": m.min_decode, "decode_tps": obs.decode_tps.value,
                "target_prefill": st.target_prefill if st else None, "target_decode": st.target_decode if st else None,
                "action": dec.action.value if dec else None, "reason": dec.reason.value if dec else None,
                "groups": [{"name": gs.name, "domain": gs.group.domain, "prefill": gs.group.num_prefill,
                            "decode": gs.group.num_decode, "withdrawn": gs.prefill.withdrawn + gs.decode.withdrawn}
                           for gs in view.groups.get(name, ())]}
        return {"t": round(now, 3), "tick": self.ticks, "budget": {
            "total": self.spec.gpu_budget, "by_type": dict(self.spec.gpu_budget_by_type),
            "used_total": sum(used.values()), "used_by_type": used},
            "services": services, "in_progress": [asdict(p) for p in self.state.preemptions]}

    def _load(self) -> tuple[PolicyState, int]:
        raw = self._kv.get(fleet_state_key(self.spec.name))
        if not raw:
            return PolicyState(), 0
        try:
            policy, _, ticks = persistence.decode(raw, lambda *a: None)
            return policy, ticks
        except persistence.StateError as exc:
            logger.error("ignoring the saved state of fleet %s: %s", self.spec.name, exc)
            return PolicyState(), 0

    # ---- inspection ----------------------------------------------------------------------------------------------

    async def ping(self) -> dict:
        return {"fleet": self.spec.name, "ticks": self.ticks}

    async def status(self) -> dict:
        return {"fleet": self.spec.name, "ticks": self.ticks, "control_period_s": self.spec.control_period_s,
                **self.last, "preemptions": list(self.preemptions), "errors": dict(self.errors)}

    async def tick_now(self) -> dict | None:
        import asyncio

        return await asyncio.to_thread(self.tick)
