"""The port between the control cycle and a world, and the one driver loop step.

A world (the fleet simulator's `bench.sim.world.SimWorld`, the live Ray controller) implements `World`: it reports
what it observes and what its cluster looks like, and applies actions. `step()` is the whole loop body: observe,
run the pure `cycle()`, apply — after `reconcile(now_s)` for a world that has one (the live world sets back
what drifted and adopts or retires what it has no record of; `observe` only reads). No other module writes an observe/decide/place loop. `decision_entry` is one
decision-log row (the live controller's log and the simulated twin's, `bench.sim.twin`). Pure: the clock is the
caller's `now_s`; I/O happens only inside the world's methods.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any, Protocol, Sequence

from autoscaler.cycle import ClusterView, CycleConfig, CycleResult, GroupAction, GroupActionKind, cycle
from autoscaler.model import Observation, PolicyState


class World(Protocol):
    """A world may also have `reconcile(now_s)`, which `step` calls first: set back what drifted from what was
    applied, with no decision of its own (the live world; the simulated ones cannot drift)."""

    def observe(self, now_s: float) -> Observation:
        """Windowed signals per service (missing or stale values stay missing)."""

    def cluster_view(self, now_s: float) -> ClusterView:
        """Accelerator nodes with free GPUs and each service's DGs with their targets and replica states."""

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> Sequence[GroupAction]:
        """Make each DG's desired state real (idempotent: the same actions twice change nothing). Every action
        is tried; returns those it could not make real (a probe that did not fit, a failed call)."""


def step(world: World, state: PolicyState, now_s: float, config: CycleConfig
         ) -> tuple[CycleResult, PolicyState, Observation, ClusterView]:
    """One control period: observe, decide and place, apply what is not advisory. Returns the cycle's result
    (with the actions the world could not make real in `failed`) and the new state, which holds what happened
    (`unapplied`), and what it observed (for the decision log and the parity replay)."""
    reconcile = getattr(world, "reconcile", None)
    if reconcile is not None:  # a world whose actuator can drift (the live one): set it back first, explicitly
        reconcile(now_s)
    observation = world.observe(now_s)
    view = world.cluster_view(now_s)
    result, new_state = cycle(state, observation, view, now_s, config)
    failed = tuple(world.apply([a for a in result.actions if not a.advisory], now_s))
    if failed:
        result = replace(result, failed=failed)
        new_state = unapplied(state, new_state, view, result.actions, failed)
    return result, new_state, observation, view


def unapplied(before: PolicyState, after: PolicyState, view: ClusterView, actions: Sequence[GroupAction],
              failed: Sequence[GroupAction]) -> PolicyState:
    """The state after a step whose world could not make `failed` real (every other action happened):
    - a service whose failed action would have withdrawn or cut (a REMOVE, a WITHDRAW, a SCALE lowering a role)
      keeps its state from before the cycle, so the next cycle decides the same step again (a termination is
      retried, a soft scale-in is not taken as started);
    - otherwise (growth that did not happen: a probe that did not fit, a failed deploy) its targets fall to what
      its groups hold after the actions that happened, as for a scale-out place() could not fit (`_realized`);
      the cooldown the attempt started stays."""
    services = dict(after.services)
    for name in sorted({a.service for a in failed}):
        held = {gs.name: (gs.group.num_prefill, gs.group.num_decode) for gs in view.groups.get(name, ())}
        mine = [a for a in failed if a.service == name]
        if any(_cuts(a, held) for a in mine):
            if name in before.services:
                services[name] = before.services[name]
            else:
                services.pop(name, None)
            continue
        bad = {a.group.name for a in mine}
        for a in actions:
            if a.service == name and a.group.name not in bad:
                if a.kind is GroupActionKind.REMOVE:
                    held.pop(a.group.name, None)
                else:
                    held[a.group.name] = (a.group.num_prefill, a.group.num_decode)
        st = services.get(name)
        if st is not None and st.soft is None:
            have_p, have_d = sum(p for p, _ in held.values()), sum(d for _, d in held.values())
            services[name] = replace(st, target_prefill=min(st.target_prefill, max(have_p, 1)),
                                     target_decode=min(st.target_decode, max(have_d, 1)))
    return replace(after, services=services)


def _cuts(action: GroupAction, held: dict[str, tuple[int, int]]) -> bool:
    if action.kind in (GroupActionKind.REMOVE, GroupActionKind.WITHDRAW):
        return True
    before = held.get(action.group.name)
    return before is not None and (action.group.num_prefill < before[0] or action.group.num_decode < before[1])

def _signal(sig) -> float | None:
    v = sig.value
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(v, 6)


def decision_entry(now_s: float, service: str, observation: Observation, result: CycleResult, note: str = ""
                   ) -> dict[str, Any]:
    """One decision-log row: time, observation summary, targets, actions and the reason."""
    obs = observation.services[service]
    dec = result.decision.services[service]
    return {
        "t": round(now_s, 3), "service": service,
        "observation": {"decode_tps": _signal(obs.decode_tps), "prefill_kv_miss_tps": _signal(obs.prefill_kv_miss_tps),
                        "ttft_s": _signal(obs.ttft_s), "tbt_s": _signal(obs.tbt_s), "startup_s": _signal(obs.startup_s),
                        "prefill": asdict(obs.prefill), "decode": asdict(obs.decode), "note": note},
        "action": dec.action.value, "reason": dec.reason.value,
        "target_prefill": dec.target_prefill, "target_decode": dec.target_decode,
        "withdraw_prefill": dec.withdraw_prefill, "withdraw_decode": dec.withdraw_decode,
        "advisory": dec.advisory,
        "diagnostics": {k: v for k, v in asdict(dec.diagnostics).items() if v not in (None, "", False)},
        "actions": [{"kind": a.kind.value, "group": a.group.name, "domain": a.group.domain,
                     "num_prefill": a.group.num_prefill, "num_decode": a.group.num_decode,
                     "withdrawn_prefill": a.withdrawn_prefill, "withdrawn_decode": a.withdrawn_decode,
                     "reason": a.reason.value, "why": a.why.value if a.why else None} for a in result.actions],
        "unplaced": [{"num_prefill": u.num_prefill, "num_decode": u.num_decode, "why": u.why.value,
                      "detail": u.detail} for u in result.unplaced],
        "failed": [{"kind": a.kind.value, "group": a.group.name, "num_prefill": a.group.num_prefill,
                    "num_decode": a.group.num_decode} for a in result.failed],
        "preempted": [{"service": p.service, "group": p.group, "for_service": p.for_service}
                      for p in result.preempted if service in (p.service, p.for_service)],
    }


def service_part(result: CycleResult, service: str) -> CycleResult:
    """A fleet cycle's result as one service sees it: its decision, actions, unplaced and failed parts (the
    preemptions it gave or took stay)."""
    return replace(result, decision=replace(result.decision, services={service: result.decision.services[service]}),
                   actions=tuple(a for a in result.actions if a.service == service),
                   unplaced=tuple(u for u in result.unplaced if u.service == service),
                   failed=tuple(a for a in result.failed if a.service == service),
                   preempted=tuple(p for p in result.preempted if service in (p.service, p.for_service)))
