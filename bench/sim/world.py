"""The simulated world our control cycle drives: the first implementation of `autoscaler.port.World`.

Per deployment group (DG) it keeps Ready, starting and withdrawn instances; `observe()` reports last tick's
fluid signals, `cluster_view()` the fleet's nodes with free GPUs (total minus what DGs hold, charged to the
DG's domain nodes of the right type, fullest first; the paper's scheduler rebuilds this view each cycle) and
the DGs, and `apply()` makes the cycle's actions real: added instances become Ready after `startup_s`,
terminated ones go at once (starting ones first, they serve nothing yet). `run_heteroscale` is "advance the
world, call the shared step, account". Pure Python; simulated time only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from autoscaler.cycle import ClusterView, CycleConfig, GroupAction, GroupActionKind, GroupState
from autoscaler.model import Action, Reason, FleetConfig, Observation, PolicyConfig, PolicyState, RoleCounts, ServiceObservation, Signal
from autoscaler.ratio import ratio_in_force
from autoscaler.port import step
from bench.sim.curation import Stress, ours_stress
from bench.sim.days import previous_day, starts_cold
from bench.sim.model import (Instances, PolicyResult, Scenario, SimService, Tick, account, attainment, choose,
                             combine_ticks, evaluate)
from common.vocab import DeploymentGroup, NodeInfo, Scope
from common.wire import routing_weights
from placement.scheduler import ServiceShape, in_band


@dataclass
class SimGroup(Instances):
    """One DG's instances. Its targets = Ready + starting; withdrawn ones are Ready, out of routing."""

    group: DeploymentGroup | None = None
    withdrawn_prefill: int = 0
    withdrawn_decode: int = 0

    def routable(self) -> tuple[int, int]:
        return max(0, self.ready_prefill - self.withdrawn_prefill), max(0, self.ready_decode - self.withdrawn_decode)

    @property
    def withdrawn_whole(self) -> bool:
        """Every replica withdrawn (draining to go, a preempted group among them): it routes nothing."""
        return (self.withdrawn_prefill, self.withdrawn_decode) == (self.group.num_prefill, self.group.num_decode)

    def state(self) -> GroupState:
        pending_p, pending_d = self.pending_counts()
        return GroupState(self.group,
                          RoleCounts(self.ready_prefill - self.withdrawn_prefill, pending_p, self.withdrawn_prefill),
                          RoleCounts(self.ready_decode - self.withdrawn_decode, pending_d, self.withdrawn_decode))


def policy_config(svc: SimService, stress: Stress, adaptive: bool = False, predict: bool = False) -> PolicyConfig:
    """Our policy for a simulated service: the curated (stress-tested) decode target and P:D ratio; with
    `adaptive`, the ratio follows the workload (`autoscaler.ratio`) from the stress test's
    prefill target in KV-miss tokens, smoothed over the scale-in cooldown with the hysteresis band's width;
    with `predict`, the start-up-aware forecast over a day's profile in 5-minute bins and the burst path."""
    adaptive_fields = dict(target_prefill_tps_per_instance=stress.target_prefill_tps_per_instance * svc.kv_miss,
                           ratio_window_s=300.0, ratio_hysteresis=stress.hysteresis_band) if adaptive else {}
    if predict:  # and the burst path: two requests queued per ready decode instance act at once
        adaptive_fields |= dict(forecast_period_s=86_400.0, forecast_bin_s=300.0, burst_queue_per_decode=2.0)
    return PolicyConfig(**adaptive_fields, target_decode_tps_per_instance=stress.target_decode_tps_per_instance,
                        prefill_per_decode=stress.prefill_per_decode, hysteresis_band=stress.hysteresis_band,
                        max_prefill=100_000, max_decode=100_000, tbt_slo_s=svc.tbt_slo_s,
                        ttft_slo_s=svc.ttft_slo_s, priority=svc.priority, gpus_per_prefill=svc.tp_prefill,
                        gpus_per_decode=svc.tp_decode, scale_out_cooldown_s=60.0, scale_in_cooldown_s=300.0,
                        soft_scale_in_window_s=120.0, staleness_limit_s=90.0, latency_cooldown_s=60.0)


def service_shape(svc: SimService) -> ServiceShape:
    return ServiceShape(svc.name, (svc.prefill_gpu,), (svc.decode_gpu,), affinity=svc.affinity,
                        priority=svc.priority, gpus_per_prefill=svc.tp_prefill, gpus_per_decode=svc.tp_decode)


def cycle_config(scenario: Scenario, tuned_on: Scenario | None = None, headroom: float | None = None,
                 adaptive: bool = False, predict: bool = False, prefill: float | None = None) -> CycleConfig:
    """Our policy's configuration for `scenario`, curated on `tuned_on` (default: the scenario itself). With
    `headroom`, every service's decode target is that share of its measured capacity instead of the curated
    one (a point of ours' front; the ratio stays the curated one); with `prefill`, every service's prefill is
    sized that many times the curated (the P:D ratio times it, the prefill target divided by it)."""
    stress = ours_stress(tuned_on or scenario)  # its runs memoized per scenario
    if headroom is not None:
        stress = {name: replace(st, target_decode_tps_per_instance=headroom * st.max_decode_tps_per_instance,
                                hysteresis_band=min(st.hysteresis_band, max(0.0, 1 / headroom - 1.005)))
                  for name, st in stress.items()}
    if prefill is not None:
        stress = {name: replace(st, prefill_per_decode=prefill * st.prefill_per_decode,
                                target_prefill_tps_per_instance=st.target_prefill_tps_per_instance / prefill)
                  for name, st in stress.items()}
    fleet = FleetConfig(services={s.name: policy_config(s, stress[s.name], adaptive, predict)
                                  for s in scenario.services})
    return CycleConfig(fleet=fleet, shapes={s.name: service_shape(s) for s in scenario.services})


class SimWorld:
    """The fleet of a scenario under our control cycle (implements `autoscaler.port.World`)."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.services = {s.name: s for s in scenario.services}
        # per window of each service's day; a cluster-scope DG's KV cache crosses the spine
        # (`perf_model.kv_transfer_time_s(cross_domain=True)`)
        self.caps = {s.name: s.capacities for s in scenario.services}
        self._kv_miss_tps: dict[str, float] = {}
        self.groups: dict[str, dict[str, SimGroup]] = {s.name: {} for s in scenario.services}
        self.last_ticks: dict[str, Tick] = {}
        self._routable: dict[str, tuple[int, int]] = {}  # last tick's routable (prefill, decode) per service
        self._tp = {s.name: (s.tp_prefill, s.tp_decode) for s in scenario.services}
        # Where each DG's GPUs sit: the DG's domain nodes of the right type, charged in node order as it grows
        # and released newest first as it shrinks (the paper's scheduler rebuilds this view each cycle).
        self._free = {n.node_id: n.total_gpus for n in scenario.nodes}
        self._held: dict[tuple[str, str, int], list[list]] = {}  # (service, DG, role index) -> [[node, GPUs]]
        self._domain_nodes: dict[tuple[str, str, str], list[str]] = {}  # (scope, domain, type) -> node ids
        for n in scenario.nodes:
            for key in (("s1", n.s1), ("s2", n.s2), ("cluster", "*")):
                self._domain_nodes.setdefault((*key, n.gpu_type), []).append(n.node_id)
        self._node_list = [replace(n, free_gpus=n.total_gpus) for n in scenario.nodes]
        self._index = {n.node_id: i for i, n in enumerate(scenario.nodes)}
        self._changed: set[str] = set()
        # per service: its DGs' states by name and their totals per role, until an action or a start-up ends
        self._states: dict[str, tuple[tuple[GroupState, ...], RoleCounts, RoleCounts]] = {}
        self.max_unheld_gpus = 0  # most GPUs a DG's instances ever lacked on its domain's nodes (0: never)
        self._nodes: tuple[NodeInfo, ...] = tuple(self._node_list)

    # ---- the port ------------------------------------------------------------------------------------------------

    def observe(self, now_s: float) -> Observation:
        services = {}
        for name in self.services:
            # With no routable instance of a role nothing completes: no latency or throughput sample exists
            # (the live world's signals are missing then too), so nothing is reported.
            tick = self.last_ticks.get(name) if min(self._routable.get(name, (1, 1))) > 0 else None
            _, prefill, decode = self._group_states(name)
            services[name] = ServiceObservation(
                # the live signal: decode tokens/s x offered / admitted requests (`autoscaler.signals`: the
                # ingress's admission bound sheds what a saturated pool cannot take, and shed load is demand)
                decode_tps=Signal(tick.demand_tps, now_s) if tick else Signal(),
                prefill_kv_miss_tps=Signal(self._kv_miss_tps[name], now_s) if tick and name in self._kv_miss_tps
                else Signal(),
                ttft_s=Signal(tick.ttft_p90_s, now_s) if tick else Signal(),
                tbt_s=Signal(tick.tbt_s, now_s) if tick else Signal(),
                prefill=prefill, decode=decode,
                startup_s=Signal(max(self.services[name].startup(self.scenario.startup_s)), now_s),
                # the burst path's queue: requests of the last tick the decode pool did not serve
                queued=Signal(max(0.0, tick.demand_tps - tick.decode_tps) / self.services[name].at(now_s).mean_output
                              * self.scenario.tick_s, now_s) if tick else Signal())
        return Observation(services=services)

    def cluster_view(self, now_s: float) -> ClusterView:
        if self._changed:
            for node_id in self._changed:
                i = self._index[node_id]
                self._node_list[i] = replace(self._node_list[i], free_gpus=self._free[node_id])
            self._nodes, self._changed = tuple(self._node_list), set()
        return ClusterView(nodes=self._nodes, groups={name: self._group_states(name)[0] for name in self.groups})

    def _group_states(self, name: str) -> tuple[tuple[GroupState, ...], RoleCounts, RoleCounts]:
        hit = self._states.get(name)
        if hit is None:
            states = tuple(g.state() for _, g in sorted(self.groups[name].items()))
            hit = self._states[name] = (states, RoleCounts.total(s.prefill for s in states),
                                        RoleCounts.total(s.decode for s in states))
        return hit

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> tuple[GroupAction, ...]:
        """Every action happens (the simulated world has no failures): returns none."""
        for action in actions:
            self._states.pop(action.service, None)
            groups = self.groups[action.service]
            name = action.group.name
            if action.kind is GroupActionKind.REMOVE:
                groups.pop(name, None)
                self._charge(action.service, action.group, 0, 0)
                continue
            chosen = action.placement.node_gpus if action.placement is not None else ()
            self._charge(action.service, action.group, action.group.num_prefill, action.group.num_decode, chosen)
            g = groups.get(name)
            if g is None:
                g = groups[name] = SimGroup(group=action.group)
            g.resize((action.group.num_prefill, action.group.num_decode), now_s,
                     self.services[action.service].startup(self.scenario.startup_s))
            g.group = action.group
            g.withdrawn_prefill, g.withdrawn_decode = action.withdrawn_prefill, action.withdrawn_decode
        return ()

    def _charge(self, service: str, group: DeploymentGroup, num_prefill: int, num_decode: int,
                chosen: tuple[tuple[str, str, int], ...] = ()) -> None:
        """Hold exactly the GPUs of (num_prefill, num_decode) instances of this DG: growth on the nodes
        `place()` chose for it (`chosen`: (role, node, GPUs)), anything else on the DG's domain nodes of the
        right type in order; shrinking releases the newest first."""
        tp = self._tp[service]
        for role, (gpu_type, want) in enumerate(((group.prefill_gpu_type, num_prefill * tp[0]),
                                                 (group.decode_gpu_type, num_decode * tp[1]))):
            role_name = ("prefill", "decode")[role]
            preferred = [(node, gpus) for r, node, gpus in chosen if r == role_name]
            held = self._held.setdefault((service, group.name, role), [])
            have = sum(g for _, g in held)
            while have > want:  # release newest first
                node_id, gpus = held[-1]
                give = min(gpus, have - want)
                self._free[node_id] += give
                self._changed.add(node_id)
                have -= give
                if give == gpus:
                    held.pop()
                else:
                    held[-1][1] -= give
            if have < want:
                domain_nodes = self._domain_nodes.get((group.scope, group.domain, gpu_type), [])
                for node_id, most in preferred + [(n, want) for n in domain_nodes]:
                    take = min(self._free[node_id], want - have, most)
                    if take:
                        self._free[node_id] -= take
                        self._changed.add(node_id)
                        held.append([node_id, take])
                        have += take
                        if have == want:
                            break
            self.max_unheld_gpus = max(self.max_unheld_gpus, want - have)
            if not held:
                del self._held[(service, group.name, role)]

    def prime(self, now_s: float) -> None:
        """Warm start: report each service's demand at `now_s` as served within its SLOs (the load the fleet
        carried before the simulated window) and make every starting instance Ready at once."""
        for name, svc in self.services.items():
            demand = svc.shape.rate(now_s) * svc.at(now_s).mean_output
            self.last_ticks[name] = Tick(demand, 0.0, 0.0, 1.0, 1.0, demand, 0.0)
            self._routable[name] = (1, 1)
            for g in self.groups[name].values():
                g.pending = [(-math.inf, p, d) for _, p, d in g.pending]
                g.promote(now_s)
        self._states.clear()

    # ---- the world's own time --------------------------------------------------------------------------------------

    def advance(self, now_s: float) -> None:
        for name, groups in self.groups.items():
            for g in groups.values():
                if g.pending:
                    g.promote(now_s)
                    self._states.pop(name, None)

    def serve(self, now_s: float, result: PolicyResult) -> None:
        """One tick of traffic at every service, scored per deployment group as the live system runs: the
        ingress splits a service's requests over its DGs by the live routing table's weights (from each DG's
        routable prefill and decode, `common.wire.routing_weights`), and each DG is its own prefill queue and
        decode pool (KV never leaves a DG). Accounts every DG into `result`."""
        for name, svc in self.services.items():
            rps = svc.shape.rate(now_s)
            here = svc.at(now_s)
            self._kv_miss_tps[name] = rps * here.mean_input * here.kv_miss
            groups = list(self.groups[name].values())
            routable = [g.routable() for g in groups]
            weight = sum(d for _, d in routable)
            self._routable[name] = (sum(p for p, _ in routable), weight)
            routable = [(p, d, rps * w / weight if weight else 0.0)
                        for (p, d), w in zip(routable, routing_weights(routable))]
            parts = []
            for g, (p, d, share) in zip(groups, routable):
                svc_t, cap = self.caps[name].at(now_s, g.group.scope == Scope.CLUSTER)
                tick = evaluate(svc_t, cap, share, p, d)
                parts.append((share, tick))
                account(result, svc_t, cap, tick, share, (g.ready_prefill, g.ready_decode), g.allocated(),
                        self.scenario.tick_s, now_s)
            if not weight:  # nothing routable: every request of the tick fails
                svc_t, cap = self.caps[name].at(now_s)
                tick = evaluate(svc_t, cap, rps, 0, 0)
                parts.append((rps, tick))
                account(result, svc_t, cap, tick, rps, (0, 0), (0, 0), self.scenario.tick_s, now_s)
            self.last_ticks[name] = combine_ticks(parts)


@dataclass(frozen=True)
class CycleRecord:
    """What one control period saw and did (for the parity replay and tests)."""

    now_s: float
    observation: Observation
    view: ClusterView
    actions: tuple[GroupAction, ...]


WARM_UP_CYCLES = 80  # at most; it ends at the first cycle that changes nothing, waits on no cooldown and has no
# scale-in open (a cold fleet grows by at most max_step_fraction per scale-out cooldown)


def warm_up(world: SimWorld, state: PolicyState, config: CycleConfig, record: list[CycleRecord] | None = None
            ) -> PolicyState:
    """Size the fleet for the load at t = 0 before the window opens (every policy starts warm): cycles at
    t < 0 on primed signals, their instances Ready at once."""
    tick = world.scenario.tick_s
    for i in range(WARM_UP_CYCLES, 0, -1):
        world.prime(0.0)
        result, state, observation, view = step(world, state, -i * tick, config)
        if record is not None:
            record.append(CycleRecord(-i * tick, observation, view, result.actions))
        settled = all(d.reason is not Reason.COOLDOWN for d in result.decision.services.values())
        if not result.actions and settled and all(s.soft is None for s in state.services.values()):
            break
    world.prime(0.0)
    world.last_ticks.clear()
    return state


def run_heteroscale(scenario: Scenario, record: list[CycleRecord] | None = None, tuned_on: Scenario | None = None,
                    headroom: float | None = None, adaptive: bool | None = None, predict: bool | None = None,
                    prefill: float | None = None) -> PolicyResult:
    """Ours: every tick the shared control cycle (decide + place) against the simulated world, warm at t = 0;
    settings curated on `tuned_on` (default: this scenario), see `cycle_config`; `adaptive`: the adaptive or
    the fixed ratio, `predict`: the start-up-aware forecast or none (its history: ours' runs on the days before,
    `_history`, the curated targets' run); `headroom`, `prefill`: see `cycle_config`. None: what `ours_mode`
    chooses on `tuned_on` (all four None: its headroom and prefill too, else the curated targets)."""
    if adaptive is None or predict is None:
        chosen = ours_mode(tuned_on or scenario)[0]
        if adaptive is None and predict is None and headroom is None and prefill is None:  # its whole choice
            headroom, prefill = chosen["headroom"], chosen["prefill"]
        adaptive = chosen["adaptive"] if adaptive is None else adaptive
        predict = chosen["predict"] if predict is None else predict
    tuned_on = tuned_on or scenario
    history = _history(scenario, tuned_on, adaptive) if predict else None
    result, state = _run(scenario, cycle_config(scenario, tuned_on, headroom, adaptive, predict, prefill), record,
                         history)
    if predict and headroom is None and prefill is None and (scenario.name, tuned_on.name, adaptive) not in _HISTORY:
        _keep_history((scenario.name, tuned_on.name, adaptive), state)  # the next day's history: the same run
    return result


def run_config(scenario: Scenario, config: CycleConfig, uncoordinated: bool = False) -> PolicyResult:
    """Our cycle at an explicit configuration (a fleet budget, priorities; `bench/scripts/fleet_arbitration.py`).
    `uncoordinated`: per-service controllers without an arbiter (`uncoordinated_step`) after the same warm start."""
    return _run(scenario, config, stepper=uncoordinated_step if uncoordinated else step)[0]


def uncoordinated_step(world: SimWorld, state: PolicyState, now_s: float, config: CycleConfig):
    """What one controller per service does without an arbiter: each service's own cycle over the same view
    (none sees what the others place this tick, so two may plan into the same free GPUs; the world holds what
    it can and counts the rest in `max_unheld_gpus`), no fleet budget; every action applied after. Returns what
    `autoscaler.port.step` does."""
    from autoscaler.cycle import CycleResult, cycle
    from autoscaler.model import Decision

    observation, view = world.observe(now_s), world.cluster_view(now_s)
    decisions, actions, unplaced, services = {}, [], [], dict(state.services)
    for name, policy in config.fleet.services.items():
        own = CycleConfig(FleetConfig({name: policy}), {name: config.shapes[name]}, config.scheduler)
        mine = PolicyState({name: state.services[name]} if name in state.services else {})
        result, after = cycle(mine, observation, view, now_s, own)
        decisions.update(result.decision.services)
        actions += result.actions
        unplaced += result.unplaced
        services.update(after.services)
    world.apply([a for a in actions if not a.advisory], now_s)
    return (CycleResult(Decision(decisions), tuple(actions), tuple(unplaced)), replace(state, services=services),
            observation, view)


def _run(scenario: Scenario, config: CycleConfig, record: list[CycleRecord] | None = None,
         history: dict | None = None, stepper=step) -> tuple[PolicyResult, PolicyState]:
    world = SimWorld(scenario)
    result = PolicyResult(dg_ratio_violations=0)
    state = warm_up(world, PolicyState(), config, record)
    if history:  # the forecast's profiles as the day before left them: a new period begins at t = 0
        state = replace(state, services={name: replace(st, profile=history[name].next_period(-1))
                                      if name in history else st for name, st in state.services.items()})
    t = 0.0
    while t < scenario.duration_s:
        world.advance(t)
        cycle_result, state, observation, view = stepper(world, state, t, config)
        if record is not None:
            record.append(CycleRecord(t, observation, view, cycle_result.actions))
        result.num_preemptions += len(cycle_result.preempted)
        for name, dec in cycle_result.decision.services.items():
            if dec.action in (Action.SCALE_OUT, Action.RESTORE, Action.SCALE_IN, Action.TERMINATE_WITHDRAWN):
                result.num_scale_actions += 1
            if dec.reason is Reason.BUDGET_LIMITED and dec.action is Action.SCALE_IN and \
                    (dec.withdraw_prefill or dec.withdraw_decode):
                result.num_budget_cuts += 1
            policy = config.fleet.services[name]
            ratio = ratio_in_force(policy, t, dec.target_prefill, dec.target_decode, state.services.get(name))
            if not policy.ratio_holds(dec.target_prefill, dec.target_decode, ratio):
                result.ratio_violations += 1
            result.dg_ratio_violations += sum(not in_band(g.group.num_prefill, g.group.num_decode, ratio)
                                              for g in world.groups[name].values() if not g.withdrawn_whole)
        result.unplaced += len(cycle_result.unplaced)
        world.serve(t, result)
        t += scenario.tick_s
    result.max_unheld_gpus = world.max_unheld_gpus
    return result, state


_HISTORY: dict[tuple[str, str, bool], dict] = {}


def _history(day: Scenario, tuned_on: Scenario, adaptive: bool) -> dict | None:
    """The forecast profiles ours carries into `day`: those its run on the day before left (settings from
    `tuned_on`, the forecast on), that run itself carrying the day before's, back to the day it started cold
    (`bench.sim.days.starts_cold`: the eve of the held-out protocol's first day), as a controller that runs on
    from day to day would. service -> Profile; None where `day` starts cold or has no day before (not made by
    `day_of`)."""
    if not has_history(day):
        return None
    before = previous_day(day)
    key = (before.name, tuned_on.name, adaptive)
    if key not in _HISTORY:
        _, state = _run(before, cycle_config(before, tuned_on, None, adaptive, True),
                        history=_history(before, tuned_on, adaptive))
        _keep_history(key, state)
    return _HISTORY[key]


def _keep_history(key: tuple[str, str, bool], state: PolicyState) -> None:
    carry_history(key, {name: st.profile for name, st in state.services.items() if st.profile is not None})


def has_history(day: Scenario) -> bool:
    """Whether ours carries a forecast history into `day` (`_history` would find one), without running for it."""
    try:
        previous_day(day)
    except ValueError:
        return False
    return not starts_cold(day)


def kept_history(day: Scenario, tuned_on: Scenario, adaptive: bool) -> dict | None:
    """The forecast profiles ours' forecast run on `day` (settings from `tuned_on`) left for the next day."""
    return _HISTORY.get((day.name, tuned_on.name, adaptive))


def carry_history(key: tuple[str, str, bool], profiles: dict) -> None:
    """Keep the profiles a run on day `key[0]` left (`kept_history` of a run in another process, say)."""
    if len(_HISTORY) >= 8:
        _HISTORY.pop(next(iter(_HISTORY)))
    _HISTORY[key] = profiles


_MODES: dict[str, tuple[dict, list[dict]]] = {}
MODES = tuple({"adaptive": a, "predict": p} for a in (False, True) for p in (False, True))


def mode_name(mode: dict) -> str:
    """"fixed" / "adaptive" ratio, "+forecast" with the forecast."""
    return ("adaptive" if mode["adaptive"] else "fixed") + ("+forecast" if mode["predict"] else "")


def ours_mode(tuning_day: Scenario) -> tuple[dict, list[dict]]:
    """Curation's choice of ours' setting (paper Algorithm 1's rule, on the tuning day only, the forecast's
    history from the day before it): first each mode (fixed or adaptive ratio, with or without the forecast) at
    the per-service curated targets and at each of `HEADROOMS` (every service's decode target that share of its
    measured capacity), the whole grid as each baseline's is swept (`mode_settings`); then the setting that
    chose with its prefill sized at each of `PREFILL_SCALES` x the curated; at each stage and of all, the cheapest
    meeting the goal (near-ties to the best attainment), else the best attainment (`choose`). ({adaptive,
    predict, headroom, prefill}: None is the curated; what was tried); memoized per day. A scenario that is not
    a day tries no forecast."""
    if tuning_day.name not in _MODES:
        tried = []

        def attempt(setting: dict) -> None:
            s = run_heteroscale(tuning_day, tuned_on=tuning_day, **setting).summary()
            tried.append({"setting": setting, "gpu_hours": s["gpu_hours"], "attainment": attainment(s)})

        for mode in modes_to_try(tuning_day):
            for setting in mode_settings(mode):
                attempt(setting)
        for stage in CURATION_STAGES:
            for setting in stage(choose(tried)["setting"]):
                attempt(setting)
        if len(_MODES) >= 4:
            _MODES.pop(next(iter(_MODES)))
        _MODES[tuning_day.name] = (choose(tried)["setting"], tried)
    return _MODES[tuning_day.name]


HEADROOMS = (1.02, 1.06, 1.1, 1.2)  # decode headrooms h curation also tries (target = capacity / h)
PREFILL_SCALES = (0.9, 0.95, 1.05, 1.1)  # prefill sized this many times the curated, tried last


def curated(mode: dict) -> dict:
    """`mode` (its ratio and forecast) at the per-service curated targets."""
    return {"adaptive": mode["adaptive"], "predict": mode["predict"], "headroom": None, "prefill": None}


def headroom_settings(mode: dict) -> list[dict]:
    """`mode` at each of `HEADROOMS`, its prefill curated."""
    return [curated(mode) | {"headroom": 1 / h} for h in HEADROOMS]


def mode_settings(mode: dict) -> list[dict]:
    """`mode` at its curated targets and at each of `HEADROOMS`: its part of curation's first stage (every mode's
    headrooms are tried: the headrooms of the mode that was best at its curated targets alone missed a cheaper
    setting of another, docs/design.md, issue 22's fifth part)."""
    return [curated(mode), *headroom_settings(mode)]


def prefill_settings(setting: dict) -> list[dict]:
    """`setting` with its prefill at each of `PREFILL_SCALES`: the second stage of curation's choice."""
    return [setting | {"prefill": f} for f in PREFILL_SCALES]


CURATION_STAGES = (prefill_settings,)  # after every mode's settings, in order, each from the best so far


def setting_name(setting: dict) -> str:
    """A setting of ours by name: its mode, its decode headroom and prefill where not the curated."""
    headroom, prefill = setting.get("headroom"), setting.get("prefill")
    return (mode_name(setting) + ("" if headroom is None else f" at headroom 1/{1 / headroom:.2f}")
            + ("" if prefill is None else f", prefill x{prefill:.2f}"))


def modes_to_try(tuning_day: Scenario) -> list[dict]:
    """The modes curation tries on `tuning_day`: the forecast ones only where it has a day before."""
    return [m for m in MODES if has_history(tuning_day) or not m["predict"]]
