"""The control cycle shared by every world: observe -> decide -> place -> actions, as one pure function.

`cycle(state, observation, view, now_s, config) -> (CycleResult, state)`. Pure: no Ray, vLLM, clock,
environment or I/O (a unit test reads this module's imports). The world that calls it (the fleet simulator, the
live Ray controller) reads the observation and the cluster view and applies the actions; `autoscaler.port`
holds that contract and the one driver loop.

Per service, from the policy's absolute targets and what the service's deployment groups (DGs) hold:
- more of both roles (or of one) -> one scale-out request to `place()`: grow DGs or create new ones;
- fewer -> terminate: first the replicas the DGs already hold withdrawn (chosen by `place()` when they were
  withdrawn), then (a soft scale-in) replicas still starting, each DG only its own; a hard scale-in (no
  observation window) cuts the rest through a `place()` scale-in request (most precious RDMA tier first);
- replicas the world reports stuck (not Ready past its bound) are cancelled first, every DG kept in its band,
  and their capacity is placed again like any shortfall (the state lets go of what finds no room);
- one role up and the other down (a schedule changed the ratio) -> terminations first, then growth over what
  they left (one group is never shrunk and grown from the same old counts);
- every request carries the ratio in force (`policy.ratio_in_force`): `place()` keeps each DG inside its band;
- only a scale-in or terminate-withdrawn decision lowers what the DGs hold; any other decision whose targets are
  below what runs is raised to it, and the policy's state follows;
- the policy's withdraw counts (soft scale-in) differ from what the DGs hold withdrawn -> a restore (all back)
  or a `place()` scale-in request over the DGs' routable replicas that says which DGs withdraw how many;
- a target below the number of DGs (each DG keeps one instance per role) -> whole DGs removed when the others'
  domains have room for what the target adds to them, else one instance per DG kept;
- a scale-out that did not fit -> the policy's state is set back to what was placed (no phantom targets); one
  that opened a group with more of a role than asked (`Why.PAIRED`) -> the state rises to what runs.
- the fleet: `place()` charges every scale-out against the fleet's GPU budget left (per type and in total), and
  a scale-out that found no room may preempt whole groups of lower-priority services (`autoscaler.fleet`):
  withdrawn whole now, removed once drained, not planned meanwhile; the requester keeps its target until then.
Every action is a DG's whole desired state (targets and withdrawn counts), never a delta, so re-applying it
changes nothing; each carries the policy's reason and, where `place()` chose, the scheduler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Mapping, Sequence

from autoscaler.fleet import PREEMPTIBLE_WHY, budget_left, choose_victims, in_progress
from autoscaler.model import (Action, Decision, FleetConfig, Observation, PolicyState, Preemption, Reason,
                              RoleCounts, ServiceDecision)
from autoscaler.plan import FreeIndex, WorkingGroup, cancel_stuck, plan_service, room, totals
from autoscaler.policy import decide
from autoscaler.ratio import current_ratio, ratio_in_force
from common.vocab import DeploymentGroup, NodeInfo
from placement.scheduler import (
    ActionKind as PlaceKind,
    Placement,
    PlacementAction,
    ScaleRequest,
    SchedulerConfig,
    ServiceShape,
    Unplaced,
    Why,
    nearest_ratio_in_band,
    place,
)
from placement.topology import build_tree


@dataclass(frozen=True)
class GroupState:
    """One DG as the world sees it: its targets (in `group`) and its replicas' observed states per role."""

    group: DeploymentGroup
    prefill: RoleCounts = RoleCounts()
    decode: RoleCounts = RoleCounts()

    @property
    def name(self) -> str:
        return self.group.name


@dataclass(frozen=True)
class ClusterView:
    """The accelerator nodes (free GPUs: what no DG holds) and each service's DGs."""

    nodes: tuple[NodeInfo, ...]
    groups: Mapping[str, tuple[GroupState, ...]] = field(default_factory=dict)  # service -> its DGs


@dataclass(frozen=True)
class CycleConfig:
    fleet: FleetConfig
    shapes: Mapping[str, ServiceShape]  # per service: GPU types, affinity, GPUs per instance (for place())
    scheduler: SchedulerConfig = SchedulerConfig()

    def __post_init__(self) -> None:
        missing = sorted(set(self.fleet.services) - set(self.shapes))
        if missing:
            raise ValueError(f"services {missing} have a policy but no placement shape")


class GroupActionKind(str, Enum):
    CREATE = "create"  # a new DG (domain, GPU types, counts in `group`); `placement` is the batch to probe
    SCALE = "scale"  # an existing DG's replica targets change (grow, terminate, shrink)
    WITHDRAW = "withdraw"  # only the DG's withdrawn counts change (soft scale-in starts, or a restore)
    REMOVE = "remove"  # the DG is emptied: delete its deployments


@dataclass(frozen=True)
class GroupAction:
    """A DG's desired state after this cycle. `group` holds the absolute targets; `withdrawn_*` how many of them
    stay out of routing."""

    kind: GroupActionKind
    group: DeploymentGroup
    withdrawn_prefill: int = 0
    withdrawn_decode: int = 0
    reason: Reason = Reason.PROPORTIONAL  # the policy's reason for the service's change
    why: Why | None = None  # the scheduler's reason, where place() chose the DG
    placement: PlacementAction | None = None  # the added batch (GROW/CREATE) for an all-or-nothing probe
    advisory: bool = False  # the service is in advisory mode: log and export, never apply

    @property
    def service(self) -> str:
        return self.group.service


@dataclass(frozen=True)
class CycleResult:
    decision: Decision
    actions: tuple[GroupAction, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()  # what place() could not place or remove this cycle
    failed: tuple[GroupAction, ...] = ()  # actions the world could not make real (`autoscaler.port.step`)
    preempted: tuple[Preemption, ...] = ()  # whole groups this cycle started to preempt (`autoscaler.fleet`)


_CUTS = (Action.SCALE_IN, Action.TERMINATE_WITHDRAWN)  # the decisions that may lower what groups hold


def _soft_ratio(st) -> float | None:
    """The adaptive ratio a soft scale-in in progress withdraws towards (None: the ratio in force)."""
    return st.soft.to_ratio if st is not None and st.soft is not None else None


def cycle(state: PolicyState, observation: Observation, view: ClusterView, now_s: float, config: CycleConfig
          ) -> tuple[CycleResult, PolicyState]:
    """One control cycle for every service of the fleet (see module docstring). Pure and deterministic."""
    decision, new_state = decide(state, observation, now_s, config.fleet)
    working: dict[str, dict[str, WorkingGroup]] = {}
    scale_out: list[ScaleRequest] = []
    scale_in: list[ScaleRequest] = []
    withdraw_requests: list[ScaleRequest] = []
    index = FreeIndex(view)
    raised: set[str] = set()
    let_go: set[str] = set()  # services whose stuck replicas were cancelled
    preempting = in_progress(state, view)
    for name in sorted(config.fleet.services):
        dec = decision.services[name]
        groups = [WorkingGroup.of(gs) for gs in sorted(view.groups.get(name, ()), key=lambda gs: gs.name)]
        working[name] = {g.base.name: g for g in groups}
        for g in groups:  # a group being preempted: withdrawn whole, removed once drained; not planned
            p = preempting.get((name, g.base.name))
            if p is None:
                continue
            drained = now_s - p.started_s >= config.fleet.preempt_drain_s and not (
                g.base.prefill.ready or g.base.decode.ready)
            g.num_prefill, g.num_decode = (0, 0) if drained else (g.num_prefill, g.num_decode)
            g.withdrawn_prefill, g.withdrawn_decode = g.num_prefill, g.num_decode
        groups = [g for g in groups if (name, g.base.name) not in preempting]
        target = (dec.target_prefill, dec.target_decode)
        if any(g.base.prefill.stuck or g.base.decode.stuck for g in groups) and \
                cancel_stuck(groups, ratio_in_force(config.fleet.services[name], now_s, *target,
                                                     new_state.services.get(name))):
            # cancelled now, placed again below where there is room; what is not, the state lets go (`_realized`)
            let_go.add(name)
            groups = [g for g in groups if g.num_prefill or g.num_decode]
        held_p, held_d, _, _ = totals(groups)
        if dec.action not in _CUTS and (held_p > target[0] or held_d > target[1]):
            # Only a scale-in decision terminates: a hold, restore or scale-out never lowers what the groups
            # hold (the policy's state follows them, `_realized`); a group over the target (one opened
            # with more of a role than asked) is scaled in later through withdraw like any other.
            target = (max(target[0], held_p), max(target[1], held_d))
            raised.add(name)
        ratio = ratio_in_force(config.fleet.services[name], now_s, *target, new_state.services.get(name))
        out, terminate, withdrawing, kept = plan_service(
            config.shapes[name], ratio, target, (dec.withdraw_prefill, dec.withdraw_decode), groups,
            lambda rest, p, d, s=config.shapes[name]: room(index, s, rest, p, d),
            only_withdrawn=dec.action is Action.TERMINATE_WITHDRAWN,
            # a budget cut's termination also cancels what still starts (it was cut too, and cannot be withdrawn)
            also_starting=dec.action is Action.TERMINATE_WITHDRAWN and dec.reason is Reason.BUDGET_LIMITED,
            hard=dec.action is Action.SCALE_IN and config.fleet.services[name].soft_scale_in_window_s == 0,
            withdraw_ratio=_soft_ratio(new_state.services.get(name)))
        if kept:  # a termination found fewer withdrawn replicas than its cut: the rest stays, the state follows
            raised.add(name)
        scale_out += out
        scale_in += terminate
        withdraw_requests += withdrawing

    created: dict[str, WorkingGroup] = {}

    def apply(placement: Placement) -> None:
        for act in placement.actions:
            groups = working[act.service]
            if act.kind is PlaceKind.CREATE:
                group = DeploymentGroup(act.group, act.service, act.scope, act.domain, act.prefill_gpu_type,
                                        act.decode_gpu_type, act.num_prefill, act.num_decode)
                created[act.group] = groups[act.group] = WorkingGroup(GroupState(group), act.num_prefill, act.num_decode,
                                                                0, 0, act.why, act)
                continue
            g = groups[act.group]
            sign = 1 if act.kind is PlaceKind.GROW else -1
            g.num_prefill += sign * act.num_prefill
            g.num_decode += sign * act.num_decode
            g.withdrawn_prefill = min(g.withdrawn_prefill, g.num_prefill)
            g.withdrawn_decode = min(g.withdrawn_decode, g.num_decode)
            g.why, g.placement = act.why, act if act.kind is PlaceKind.GROW else g.placement

    def now_held(req: ScaleRequest, routable: bool = False) -> ScaleRequest:
        """The request over its service's groups as the terminations of this cycle left them."""
        held = (g.routable() if routable else g.current() for g in working[req.service.name].values())
        return replace(req, groups=tuple(g for g in held if g.num_prefill or g.num_decode))

    # Terminations first, then growth and withdrawals over what they left, so one group is never both shrunk
    # and grown from the same old counts (each inside the band, the sum outside it).
    unplaced: tuple[Unplaced, ...] = ()
    short: tuple[Unplaced, ...] = ()  # scale-outs that found no room
    withdrawn_to: dict[str, float] = {}
    tree = None
    if scale_out or scale_in or withdraw_requests:
        tree = build_tree(view.nodes)  # scale-in reads only tiers and frees nothing, so one tree serves all
        tree.budget = budget_left(view, config)
        for requests, routable in ((scale_in, False), (scale_out, False), (withdraw_requests, True)):
            if requests:
                growing = requests is scale_out
                if requests is not scale_in:  # terminations name their own groups (the doomed ones, the rest)
                    requests = [now_held(r, routable) for r in requests]
                if growing:
                    placement = place(tree, requests, config.scheduler)
                else:
                    placement, held = _place_cuts(tree, requests, state, new_state, config)
                    withdrawn_to = held if routable else withdrawn_to
                unplaced += placement.unplaced
                if growing:
                    short = tuple(u for u in placement.unplaced if u.why in PREEMPTIBLE_WHY)
                if routable:  # which DGs withdraw: the same scale-in rule, over the routable replicas only
                    for act in placement.actions:
                        g = working[act.service][act.group]
                        g.withdrawn_prefill += act.num_prefill
                        g.withdrawn_decode += act.num_decode
                        g.why = act.why
                else:
                    apply(placement)

    # while a budget cut of a lower priority runs (or ends this cycle), every higher priority left short waits for
    # it instead of preempting as well; like the requesters of preemptions in progress, it keeps asking (its
    # target is not set back), so it is placed first once the room is free
    cut = [config.fleet.services[n].priority for n, d in decision.services.items()
           if d.reason is Reason.BUDGET_LIMITED and d.action in _CUTS]
    cut_for = {u.service for u in unplaced if u.num_prefill + u.num_decode > 0
               and config.fleet.services[u.service].priority > min(cut)} if cut else set()
    preempted = _preempt(tree, [u for u in short if u.service not in cut_for], scale_out, working, new_state,
                         preempting, now_s, config) if short else []
    for p in preempted:
        g = working[p.service][p.group]
        g.withdrawn_prefill, g.withdrawn_decode, g.why = g.num_prefill, g.num_decode, None
    doomed = set(preempting) | {(p.service, p.group) for p in preempted}

    actions = []
    for name in sorted(working):
        dec = decision.services[name]
        for group_name in sorted(working[name]):
            g = working[name][group_name]
            before = g.base
            if g.num_prefill == 0 and g.num_decode == 0:
                kind = None if group_name in created else GroupActionKind.REMOVE
            elif group_name in created:
                kind = GroupActionKind.CREATE
            elif (g.num_prefill, g.num_decode) != (before.group.num_prefill, before.group.num_decode):
                kind = GroupActionKind.SCALE
            elif (g.withdrawn_prefill, g.withdrawn_decode) != (before.prefill.withdrawn, before.decode.withdrawn):
                kind = GroupActionKind.WITHDRAW
            else:
                kind = None
            if kind is None:
                continue
            reason = Reason.PREEMPTED if (name, group_name) in doomed else dec.reason
            actions.append(GroupAction(kind, g.current(), g.withdrawn_prefill, g.withdrawn_decode, reason,
                                       g.why, g.placement, dec.advisory))
    paired = {a.service for a in actions if a.why is Why.PAIRED and a.kind is not GroupActionKind.WITHDRAW}
    waiting = {p.for_service for p in (*preempting.values(), *preempted)} | cut_for
    realized = _realized(new_state, working, [u for u in unplaced if u.service not in waiting],
                         paired | raised, let_go, doomed)
    final = _ratio_follows_groups(realized, working, config)
    if withdrawn_to:  # a soft scale-in puts in force, once terminated, the ratio its withdrawal left the groups at
        final = replace(final, services={n: replace(st, soft=replace(st.soft, to_ratio=withdrawn_to[n]))
                                         if n in withdrawn_to and st.soft is not None else st
                                         for n, st in final.services.items()})
    if preempted or preempting or state.preemptions:
        final, decision = _victims_follow(final, decision, working, preempted, doomed)
        final = replace(final, preemptions=(*preempting.values(), *preempted))
    return CycleResult(decision, tuple(actions), unplaced, preempted=tuple(preempted)), final


def _place_cuts(tree, requests: Sequence[ScaleRequest], before: PolicyState, after: PolicyState,
                config: CycleConfig) -> tuple[Placement, dict[str, float]]:
    """Cuts (withdrawals, or a hard scale-in's terminations), each service on its own (a scale-in frees nothing,
    so they do not interact), and for a service on the adaptive ratio the ratio its groups hold after the cut:
    for a withdrawal, the one put in force at termination. Cutting towards a new ratio can leave groups no one
    ratio holds (a group short of prefill cannot gain any in a cut; a target kept above what runs asked cuts the
    groups cannot make); then the cut goes at the ratio in force before the decision instead."""
    actions: list = []
    unplaced: list[Unplaced] = []
    ratios: dict[str, float] = {}
    for req in requests:
        name = req.service.name
        plan = place(tree, [req], config.scheduler)
        cfg, st = config.fleet.services[name], after.services.get(name)
        if cfg.adaptive_ratio:
            aim = _soft_ratio(st) or req.prefill_per_decode
            held = nearest_ratio_in_band(_after(req, plan), aim)
            old = current_ratio(cfg, before.services.get(name))
            if held is None and old != req.prefill_per_decode:
                again = place(tree, [replace(req, prefill_per_decode=old)], config.scheduler)
                held = nearest_ratio_in_band(_after(req, again), old)
                plan = again if held is not None else plan
            if held is not None:
                ratios[name] = held
        actions += plan.actions
        unplaced += plan.unplaced
    return Placement(tuple(actions), tuple(unplaced)), ratios


def _after(req: ScaleRequest, plan: Placement) -> list[tuple[int, int]]:
    """(prefill, decode) of each group of a scale-in request after the plan's cuts (groups cut whole left out)."""
    left = {g.name: [g.num_prefill, g.num_decode] for g in req.groups}
    for act in plan.actions:
        left[act.group][0] -= act.num_prefill
        left[act.group][1] -= act.num_decode
    return [(p, d) for p, d in left.values() if p > 0 and d > 0]


def _preempt(tree, short: Sequence[Unplaced], scale_out: Sequence[ScaleRequest],
             working: dict[str, dict[str, WorkingGroup]], state: PolicyState,
             preempting: Mapping[tuple[str, str], Preemption], now_s: float, config: CycleConfig
             ) -> list[Preemption]:
    """Whole groups of lower-priority services for the scale-outs that found no room (`autoscaler.fleet`),
    highest priority first; none for a service whose preemption is still in progress."""
    policies = config.fleet.services
    requests = {r.service.name: r for r in scale_out}
    waiting = {p.for_service for p in preempting.values()}
    taken = set(preempting)
    out: list[Preemption] = []
    for u in sorted(short, key=lambda u: (-policies[u.service].priority, u.service)):
        if u.service in waiting or policies[u.service].advisory or u.service not in requests:
            continue
        held = tuple(g.current() for g in working[u.service].values() if g.num_prefill or g.num_decode)
        request = replace(requests[u.service], groups=held)
        for service, group in choose_victims(tree, request, u, working, policies, config.shapes, state, taken):
            g = working[service][group]
            out.append(Preemption(service, group, u.service, now_s, g.num_prefill, g.num_decode))
            taken.add((service, group))
    return out


def _victims_follow(state: PolicyState, decision: Decision, working: dict[str, dict[str, WorkingGroup]],
                    preempted: Sequence[Preemption], doomed: set[tuple[str, str]]) -> tuple[PolicyState, Decision]:
    """A preempted service's targets fall to what its other groups hold (its policy asks its minimum back
    from there, reason RECLAIM), and this cycle's decision for it says so."""
    services, decisions = dict(state.services), dict(decision.services)
    for name in sorted({p.service for p in preempted}):
        kept = [g for k, g in working[name].items() if (name, k) not in doomed]
        p, d = sum(g.num_prefill for g in kept), sum(g.num_decode for g in kept)
        st = services.get(name)
        if st is not None:
            services[name] = replace(st, target_prefill=p, target_decode=d, soft=None)
        mine = [x for x in preempted if x.service == name]
        before = decisions[name]
        decisions[name] = ServiceDecision(
            Action.SCALE_IN, Reason.PREEMPTED, p, d, sum(x.num_prefill for x in mine), sum(x.num_decode for x in mine),
            before.advisory, replace(before.diagnostics, note="whole groups given up for " + ", ".join(
                sorted(f"{x.group} -> {x.for_service}" for x in mine))))
    return replace(state, services=services), replace(decision, services=decisions)


def _ratio_follows_groups(state: PolicyState, working: dict[str, dict[str, WorkingGroup]], config: CycleConfig
                          ) -> PolicyState:
    """An adaptive ratio in force that the groups as placed do not all hold (a domain without room for the
    prefill a rising ratio asked, a scale-out that could not take prefill back) moves to the nearest ratio
    they all hold, so the band place() keeps them in is the ratio they run at; the policy's estimate goes on
    asking for its own. None exists: the ratio stays, and the groups outside its band are counted by the
    worlds. Skipped while a soft scale-in runs (its groups hold the old ratio until terminated)."""
    services = dict(state.services)
    for name, st in state.services.items():
        cfg = config.fleet.services.get(name)
        if cfg is None or not cfg.adaptive_ratio or st.soft is not None:
            continue
        in_force = current_ratio(cfg, st)
        counts = [(g.num_prefill, g.num_decode) for g in working.get(name, {}).values()  # the groups that serve
                  if g.num_prefill and g.num_decode and not g.withdrawn_whole]
        ratio = nearest_ratio_in_band(counts, in_force) if counts else None
        if ratio is not None and ratio != in_force:
            services[name] = replace(st, prefill_per_decode=ratio)
    return replace(state, services=services) if services != dict(state.services) else state


def _realized(state: PolicyState, working: dict[str, dict[str, WorkingGroup]], unplaced: Sequence[Unplaced],
              paired: set[str], let_go: set[str] = frozenset(), doomed: set[tuple[str, str]] = frozenset()
              ) -> PolicyState:
    """The policy's state follows what was placed, so the next step starts from the real size:
    - a scale-out that did not (fully) fit leaves the policy at the size that was placed (without this the
      target ran away to the bounds, each latency step added to a size that never existed, while the fleet
      was full); so do stuck replicas cancelled and not placed again (`let_go`);
    - groups holding more than the target (`paired`: a group opened with more of one role than asked,
      `Why.PAIRED`, because the groups' domains had no room inside the band; or a decision that may not cut
      found more than its target) raise the target to what runs, so no later cycle cuts what it never had a
      scale-in decision for (a scale-in of the extra goes through withdraw like any other)."""
    short = {u.service for u in unplaced if u.num_prefill > 0 or u.num_decode > 0} | let_go
    if not short and not paired:
        return state
    services = dict(state.services)
    for name in short | paired:
        st = services.get(name)
        if st is None or st.soft is not None:
            continue
        have_p, have_d, _, _ = totals([g for k, g in working[name].items() if (name, k) not in doomed])
        p, d = st.target_prefill, st.target_decode
        if name in short:
            p, d = min(p, have_p), min(d, have_d)
        if name in paired:
            p, d = max(p, have_p), max(d, have_d)
        if (p, d) != (st.target_prefill, st.target_decode):
            services[name] = replace(st, target_prefill=p, target_decode=d)
    return replace(state, services=services)

