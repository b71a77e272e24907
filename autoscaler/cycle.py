"""The control cycle shared by every world: observe -> decide -> place -> actions, as one pure function.

`cycle(state, observation, view, now_s, config) -> (CycleResult, state)`. Pure: no Ray, vLLM, clock,
environment or I/O (a unit test reads this module's imports). The world that calls it (the fleet simulator, the
live Ray controller) reads the observation and the cluster view and applies the actions; `autoscaler.port`
holds that contract and the one driver loop.

Per service, from the policy's absolute targets and what the service's deployment groups (DGs) hold:
- more of both roles (or of one) -> one scale-out request to `place()`: grow DGs or create new ones;
- fewer -> terminate: first the replicas the DGs already hold withdrawn (chosen by `place()` when they were
  withdrawn), the rest through a `place()` scale-in request (most precious RDMA tier first);
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
Every action is a DG's whole desired state (targets and withdrawn counts), never a delta, so re-applying it
changes nothing; each carries the policy's reason and, where `place()` chose, the scheduler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Mapping, Sequence

from autoscaler.model import Action, Decision, FleetConfig, Observation, PolicyState, Reason, RoleCounts
from autoscaler.policy import decide, ratio_in_force
from common.vocab import CLUSTER_DOMAIN, DeploymentGroup, NodeInfo, Scope
from placement.scheduler import (
    ActionKind as PlaceKind,
    Placement,
    PlacementAction,
    ScaleRequest,
    SchedulerConfig,
    ServiceShape,
    Unplaced,
    Why,
    place,
    prefill_band,
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


@dataclass
class _Group:
    """Mutable working copy of one DG during a cycle."""

    base: GroupState
    num_prefill: int
    num_decode: int
    withdrawn_prefill: int
    withdrawn_decode: int
    why: Why | None = None
    placement: PlacementAction | None = None

    @classmethod
    def of(cls, gs: GroupState) -> _Group:
        return cls(gs, gs.group.num_prefill, gs.group.num_decode, gs.prefill.withdrawn, gs.decode.withdrawn)

    @property
    def starting(self) -> tuple[int, int]:
        """Replicas of each role still starting (what a scale-in may cancel at once), as the view saw them less
        what this cycle already cut."""
        return (min(self.base.prefill.pending, self.num_prefill - self.withdrawn_prefill),
                min(self.base.decode.pending, self.num_decode - self.withdrawn_decode))

    def routable(self) -> DeploymentGroup:
        return replace(self.base.group, num_prefill=self.num_prefill - self.withdrawn_prefill,
                       num_decode=self.num_decode - self.withdrawn_decode)

    def current(self) -> DeploymentGroup:
        return replace(self.base.group, num_prefill=self.num_prefill, num_decode=self.num_decode)


def _totals(groups: Sequence[_Group]) -> tuple[int, int, int, int]:
    return (sum(g.num_prefill for g in groups), sum(g.num_decode for g in groups),
            sum(g.withdrawn_prefill for g in groups), sum(g.withdrawn_decode for g in groups))


def _terminate_withdrawn(groups: Sequence[_Group], prefill: int, decode: int) -> tuple[int, int]:
    """Terminate up to (prefill, decode) replicas that DGs hold withdrawn; returns what is left to terminate.
    (The withdrawal chose them inside each DG's band, so terminating them leaves every DG in its band.)"""
    for g in groups:
        take_p, take_d = min(prefill, g.withdrawn_prefill), min(decode, g.withdrawn_decode)
        g.num_prefill, g.withdrawn_prefill = g.num_prefill - take_p, g.withdrawn_prefill - take_p
        g.num_decode, g.withdrawn_decode = g.num_decode - take_d, g.withdrawn_decode - take_d
        prefill, decode = prefill - take_p, decode - take_d
    return prefill, decode


def _cut_starting(groups: Sequence[_Group], prefill: int, decode: int, ratio: float | None) -> tuple[int, int]:
    """Cancel up to (prefill, decode) replicas still starting, each group only its own (Serve stops a
    deployment's not-yet-running replicas first), every group kept with one of each role and inside its band;
    returns what is left to cut."""
    for g in sorted(groups, key=lambda g: (-sum(g.starting), g.base.name)):
        while decode and g.starting[1] and g.num_decode >= 2:
            shed = max(0, g.num_prefill - prefill_band(g.num_decode - 1, ratio)[1])
            if shed > min(prefill, g.starting[0]):
                break
            g.num_prefill, g.num_decode = g.num_prefill - shed, g.num_decode - 1
            prefill, decode = prefill - shed, decode - 1
            g.why = Why.STARTING_FIRST
        take = min(prefill, g.starting[0], max(0, g.num_prefill - prefill_band(g.num_decode, ratio)[0]))
        if take:
            g.num_prefill, prefill, g.why = g.num_prefill - take, prefill - take, Why.STARTING_FIRST
    return prefill, decode


def _plan_service(shape: ServiceShape, ratio: float, target: tuple[int, int], withdraw: tuple[int, int],
                  groups: list[_Group], room, only_withdrawn: bool = False, hard: bool = False
                  ) -> tuple[list[ScaleRequest], list[ScaleRequest], list[ScaleRequest], bool]:
    """The place() requests one service needs: (scale-out, terminate, withdraw), each possibly empty, and
    whether the groups keep more than the target. What a cut may take: a termination (`only_withdrawn`),
    withdrawn replicas; a soft scale-in, replicas still starting, each group its own; the rest of the cut stays
    (for a later scale-in to withdraw first). A hard scale-in (`hard`: no observation window configured) cuts
    where place()'s scale-in rule chooses.

    Every group holds at least one instance of each role, so a target below the number of groups removes
    whole groups (those with the fewest routable decode instances first; for a termination, only groups
    wholly withdrawn) when the other groups' domains have room for what the target then adds to them
    (`room(groups, prefill, decode)`); otherwise the groups stay and each role keeps one instance per group
    (removing one would open it again elsewhere next cycle)."""
    out, terminate, withdrawing = [], [], []
    surplus = len(groups) - min(target)
    if surplus > 0:  # a soft cut takes only groups with nothing ready: wholly withdrawn (termination) or starting
        candidates = [g for g in groups if hard or (g.num_prefill, g.num_decode) ==
                      ((g.withdrawn_prefill, g.withdrawn_decode) if only_withdrawn else g.starting)]
        doomed = sorted(candidates, key=lambda g: (g.num_decode - g.withdrawn_decode, g.num_decode + g.num_prefill,
                                                   g.base.name))[:surplus]
        rest = [g for g in groups if g not in doomed]
        rest_p, rest_d, _, _ = _totals(rest)
        if doomed and room(rest, max(0, target[0] - rest_p), max(0, target[1] - rest_d)):
            terminate.append(ScaleRequest(shape, -sum(g.num_prefill for g in doomed),
                                          -sum(g.num_decode for g in doomed), tuple(g.current() for g in doomed)))
            groups = rest
        else:
            target = (max(target[0], len(groups)), max(target[1], len(groups)))
    have_p, have_d, _, _ = _totals(groups)
    dp, dd = target[0] - have_p, target[1] - have_d
    left_p, left_d = _terminate_withdrawn(groups, max(0, -dp), max(0, -dd))
    if (left_p or left_d) and hard:
        terminate.append(ScaleRequest(shape, -left_p, -left_d, tuple(g.current() for g in groups), ratio))
        left_p = left_d = 0
    elif (left_p or left_d) and not only_withdrawn:  # a soft scale-in's cut of starting replicas
        left_p, left_d = _cut_starting(groups, left_p, left_d, ratio)
    kept = bool(left_p or left_d)
    if dp > 0 or dd > 0:
        out.append(ScaleRequest(shape, max(0, dp), max(0, dd), tuple(g.current() for g in groups), ratio))
    _, _, held_p, held_d = _totals(groups)
    if (held_p, held_d) != withdraw:
        if withdraw[0] < held_p or withdraw[1] < held_d:  # restore (all), then withdraw afresh if still asked
            for g in groups:
                g.withdrawn_prefill = g.withdrawn_decode = 0
            held_p = held_d = 0
        more_p, more_d = withdraw[0] - held_p, withdraw[1] - held_d
        if more_p or more_d:
            routable = tuple(r for r in (g.routable() for g in groups) if r.num_prefill or r.num_decode)
            withdrawing.append(ScaleRequest(shape, -more_p, -more_d, routable, ratio))
    return out, terminate, withdrawing, kept


_CUTS = (Action.SCALE_IN, Action.TERMINATE_WITHDRAWN)  # the decisions that may lower what groups hold


class _FreeIndex:
    """Free GPUs per (scope, domain, GPU type) of a cluster view, built on first use."""

    def __init__(self, view: ClusterView):
        self.view, self._free = view, None

    def of(self, scope: str, domain: str, gpu_type: str) -> int:
        if self._free is None:
            self._free = {}
            for n in self.view.nodes:
                for key in ((Scope.S1, n.s1), (Scope.S2, n.s2), (Scope.CLUSTER, CLUSTER_DOMAIN)):
                    k = (*key, n.gpu_type)
                    self._free[k] = self._free.get(k, 0) + n.free_gpus
        return self._free.get((scope, domain, gpu_type), 0)


def _room(index: _FreeIndex, shape: ServiceShape, groups: Sequence[_Group], prefill: int, decode: int) -> bool:
    """Whether the groups' domains have free GPUs for `prefill` and `decode` more instances (each role on its
    groups' GPU types; a first check, place() decides)."""
    if prefill == 0 and decode == 0:
        return True
    domains = {(g.base.group.scope, g.base.group.domain) for g in groups}
    types = {g.base.group.prefill_gpu_type for g in groups}, {g.base.group.decode_gpu_type for g in groups}
    free = {t: sum(index.of(scope, name, t) for scope, name in domains) for t in types[0] | types[1]}
    need: dict[str, int] = {}
    for role_types, count, per in ((types[0], prefill, shape.gpus_per_prefill), (types[1], decode, shape.gpus_per_decode)):
        if count:
            kind = max(role_types, key=lambda t: free.get(t, 0))  # the type with the most room
            need[kind] = need.get(kind, 0) + count * per
    return all(free.get(t, 0) >= n for t, n in need.items())


def cycle(state: PolicyState, observation: Observation, view: ClusterView, now_s: float, config: CycleConfig
          ) -> tuple[CycleResult, PolicyState]:
    """One control cycle for every service of the fleet (see module docstring). Pure and deterministic."""
    decision, new_state = decide(state, observation, now_s, config.fleet)
    working: dict[str, dict[str, _Group]] = {}
    scale_out: list[ScaleRequest] = []
    scale_in: list[ScaleRequest] = []
    withdraw_requests: list[ScaleRequest] = []
    index = _FreeIndex(view)
    raised: set[str] = set()
    for name in sorted(config.fleet.services):
        dec = decision.services[name]
        groups = [_Group.of(gs) for gs in sorted(view.groups.get(name, ()), key=lambda gs: gs.name)]
        working[name] = {g.base.name: g for g in groups}
        target = (dec.target_prefill, dec.target_decode)
        held_p, held_d, _, _ = _totals(groups)
        if dec.action not in _CUTS and (held_p > target[0] or held_d > target[1]):
            # Only a scale-in decision terminates: a hold, restore or scale-out never lowers what the groups
            # hold (the policy's state follows them, `_realized`); a group over the target (one opened
            # with more of a role than asked) is scaled in later through withdraw like any other.
            target = (max(target[0], held_p), max(target[1], held_d))
            raised.add(name)
        ratio = ratio_in_force(config.fleet.services[name], now_s, *target)
        out, terminate, withdrawing, kept = _plan_service(
            config.shapes[name], ratio, target, (dec.withdraw_prefill, dec.withdraw_decode), groups,
            lambda rest, p, d, s=config.shapes[name]: _room(index, s, rest, p, d),
            only_withdrawn=dec.action is Action.TERMINATE_WITHDRAWN,
            hard=dec.action is Action.SCALE_IN and config.fleet.services[name].soft_scale_in_window_s == 0)
        if kept:  # a termination found fewer withdrawn replicas than its cut: the rest stays, the state follows
            raised.add(name)
        scale_out += out
        scale_in += terminate
        withdraw_requests += withdrawing

    created: dict[str, _Group] = {}

    def apply(placement: Placement) -> None:
        for act in placement.actions:
            groups = working[act.service]
            if act.kind is PlaceKind.CREATE:
                group = DeploymentGroup(act.group, act.service, act.scope, act.domain, act.prefill_gpu_type,
                                        act.decode_gpu_type, act.num_prefill, act.num_decode)
                created[act.group] = groups[act.group] = _Group(GroupState(group), act.num_prefill, act.num_decode,
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
    if scale_out or scale_in or withdraw_requests:
        tree = build_tree(view.nodes)  # scale-in reads only tiers and frees nothing, so one tree serves all
        for requests, routable in ((scale_in, False), (scale_out, False), (withdraw_requests, True)):
            if requests:
                if requests is not scale_in:  # terminations name their own groups (the doomed ones, the rest)
                    requests = [now_held(r, routable) for r in requests]
                placement = place(tree, requests, config.scheduler)
                unplaced += placement.unplaced
                if routable:  # which DGs withdraw: the same scale-in rule, over the routable replicas only
                    for act in placement.actions:
                        g = working[act.service][act.group]
                        g.withdrawn_prefill += act.num_prefill
                        g.withdrawn_decode += act.num_decode
                        g.why = act.why
                else:
                    apply(placement)

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
            actions.append(GroupAction(kind, g.current(), g.withdrawn_prefill, g.withdrawn_decode, dec.reason,
                                       g.why, g.placement, dec.advisory))
    paired = {a.service for a in actions if a.why is Why.PAIRED and a.kind is not GroupActionKind.WITHDRAW}
    return CycleResult(decision, tuple(actions), unplaced), _realized(new_state, working, unplaced, paired | raised)


def _realized(state: PolicyState, working: dict[str, dict[str, _Group]], unplaced: Sequence[Unplaced],
              paired: set[str]) -> PolicyState:
    """The policy's state follows what was placed, so the next step starts from the real size:
    - a scale-out that did not (fully) fit leaves the policy at the size that was placed (without this the
      target ran away to the bounds, each latency step added to a size that never existed, while the fleet
      was full);
    - groups holding more than the target (`paired`: a group opened with more of one role than asked,
      `Why.PAIRED`, because the groups' domains had no room inside the band; or a decision that may not cut
      found more than its target) raise the target to what runs, so no later cycle cuts what it never had a
      scale-in decision for (a scale-in of the extra goes through withdraw like any other)."""
    short = {u.service for u in unplaced if u.num_prefill > 0 or u.num_decode > 0}
    if not short and not paired:
        return state
    services = dict(state.services)
    for name in short | paired:
        st = services.get(name)
        if st is None or st.soft is not None:
            continue
        have_p, have_d, _, _ = _totals(list(working[name].values()))
        p, d = st.target_prefill, st.target_decode
        if name in short:
            p, d = min(p, max(have_p, 1)), min(d, max(have_d, 1))
        if name in paired:
            p, d = max(p, have_p), max(d, have_d)
        if (p, d) != (st.target_prefill, st.target_decode):
            services[name] = replace(st, target_prefill=p, target_decode=d)
    return PolicyState(services=services)

