"""One service's plan inside a control cycle (`autoscaler.cycle`): working copies of its deployment groups and
the cuts a decision may make of them, pure like the cycle.

What a cut may take, by decision (the cycle's rules):
- a termination (after a soft scale-in's observation window): replicas the groups hold withdrawn;
- a soft scale-in: replicas still starting, each group only its own (`cut_starting`);
- a hard scale-in (no observation window configured): what `place()`'s scale-in rule chooses;
- any decision: replicas the world reports stuck (`cancel_stuck`: never served, not Ready past its bound).
Whole groups go only when nothing in them is ready (or, hard, as `place()` chooses); every group that stays
holds one replica of each role inside its ratio band (`placement.scheduler.prefill_band`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from common.vocab import CLUSTER_DOMAIN, DeploymentGroup, Scope
from placement.scheduler import PlacementAction, ScaleRequest, ServiceShape, Why, prefill_band

if TYPE_CHECKING:
    from autoscaler.cycle import ClusterView, GroupState


@dataclass
class WorkingGroup:
    """Mutable working copy of one DG during a cycle."""

    base: GroupState
    num_prefill: int
    num_decode: int
    withdrawn_prefill: int
    withdrawn_decode: int
    why: Why | None = None
    placement: PlacementAction | None = None

    @classmethod
    def of(cls, gs: GroupState) -> WorkingGroup:
        return cls(gs, gs.group.num_prefill, gs.group.num_decode, gs.prefill.withdrawn, gs.decode.withdrawn)

    @property
    def starting(self) -> tuple[int, int]:
        """Replicas of each role still starting (what a scale-in may cancel at once), as the view saw them less
        what this cycle already cut."""
        return (min(self.base.prefill.pending, self.num_prefill - self.withdrawn_prefill),
                min(self.base.decode.pending, self.num_decode - self.withdrawn_decode))

    @property
    def withdrawn_whole(self) -> bool:
        """Every replica withdrawn (a scale-in's before termination, or preempted): the group serves nothing."""
        return (self.withdrawn_prefill, self.withdrawn_decode) == (self.num_prefill, self.num_decode)

    def routable(self) -> DeploymentGroup:
        return replace(self.base.group, num_prefill=self.num_prefill - self.withdrawn_prefill,
                       num_decode=self.num_decode - self.withdrawn_decode)

    def current(self) -> DeploymentGroup:
        return replace(self.base.group, num_prefill=self.num_prefill, num_decode=self.num_decode)


def totals(groups: Sequence[WorkingGroup]) -> tuple[int, int, int, int]:
    return (sum(g.num_prefill for g in groups), sum(g.num_decode for g in groups),
            sum(g.withdrawn_prefill for g in groups), sum(g.withdrawn_decode for g in groups))


def terminate_withdrawn(groups: Sequence[WorkingGroup], prefill: int, decode: int) -> tuple[int, int]:
    """Terminate up to (prefill, decode) replicas that DGs hold withdrawn; returns what is left to terminate.
    (The withdrawal chose them inside each DG's band, so terminating them leaves every DG in its band.) A group
    is never left with one role: one whose every replica is withdrawn goes whole once either role of it would
    go whole; otherwise its last replica of a role stays."""
    for g in groups:
        take_p, take_d = min(prefill, g.withdrawn_prefill), min(decode, g.withdrawn_decode)
        if (take_p == g.num_prefill) != (take_d == g.num_decode):  # one role would go whole, not the other
            if g.withdrawn_whole:
                take_p, take_d = g.num_prefill, g.num_decode
            else:
                take_p, take_d = min(take_p, g.num_prefill - 1), min(take_d, g.num_decode - 1)
        g.num_prefill, g.withdrawn_prefill = g.num_prefill - take_p, g.withdrawn_prefill - take_p
        g.num_decode, g.withdrawn_decode = g.num_decode - take_d, g.withdrawn_decode - take_d
        prefill, decode = max(0, prefill - take_p), max(0, decode - take_d)
    return prefill, decode


def cancel_stuck(groups: Sequence[WorkingGroup], ratio: float | None) -> bool:
    """Cancel the replicas the world reports stuck (not Ready past its bound: never served), every group kept
    inside its band; a group left without one role goes whole (nothing can be served there: KV never leaves a
    group). Returns whether any went; the cycle places that capacity again where there is room."""
    cancelled = False
    for g in groups:
        sp, sd = g.base.prefill.stuck, g.base.decode.stuck
        if not (sp or sd):
            continue
        p, d = g.num_prefill - sp, g.num_decode - sd
        if p <= 0 or d <= 0:
            p = d = 0
        else:
            lo, hi = prefill_band(d, ratio)
            while p > hi and d < g.num_decode:  # keep a stuck decode rather than leave ready prefill idle
                d += 1
                lo, hi = prefill_band(d, ratio)
            p = max(p, min(lo, g.num_prefill))
        if (p, d) != (g.num_prefill, g.num_decode):
            g.num_prefill, g.num_decode, g.why = p, d, Why.STUCK
            g.withdrawn_prefill, g.withdrawn_decode = min(g.withdrawn_prefill, p), min(g.withdrawn_decode, d)
            cancelled = True
    return cancelled


def cut_starting(groups: Sequence[WorkingGroup], prefill: int, decode: int, ratio: float | None) -> tuple[int, int]:
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


def plan_service(shape: ServiceShape, ratio: float, target: tuple[int, int], withdraw: tuple[int, int],
                 groups: list[WorkingGroup], room, only_withdrawn: bool = False, hard: bool = False,
                 withdraw_ratio: float | None = None, also_starting: bool = False
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
    (removing one would open it again elsewhere next cycle). `withdraw_ratio`: the ratio a soft scale-in
    withdraws towards (an adaptive ratio that falls), so the groups' routable replicas, and once terminated
    the groups, sit inside its band; default `ratio`. `also_starting` (a termination of a fleet budget's cut):
    replicas still starting go too, and a group whose replicas are all withdrawn or starting goes whole."""
    out, terminate, withdrawing = [], [], []
    surplus = len(groups) - min(target)
    if surplus > 0:  # a soft cut takes only groups with nothing ready: wholly withdrawn (termination) or starting
        def gone(g: WorkingGroup) -> tuple[int, int]:  # what of the group this cut may take
            withdrawn = (g.withdrawn_prefill, g.withdrawn_decode)
            if also_starting:
                return withdrawn[0] + g.starting[0], withdrawn[1] + g.starting[1]
            return withdrawn if only_withdrawn else g.starting

        candidates = [g for g in groups if hard or (g.num_prefill, g.num_decode) == gone(g)]
        doomed = sorted(candidates, key=lambda g: (g.num_decode - g.withdrawn_decode, g.num_decode + g.num_prefill,
                                                   g.base.name))[:surplus]
        rest = [g for g in groups if g not in doomed]
        rest_p, rest_d, _, _ = totals(rest)
        if doomed and room(rest, max(0, target[0] - rest_p), max(0, target[1] - rest_d)):
            terminate.append(ScaleRequest(shape, -sum(g.num_prefill for g in doomed),
                                          -sum(g.num_decode for g in doomed), tuple(g.current() for g in doomed)))
            groups = rest
        else:
            target = (max(target[0], len(groups)), max(target[1], len(groups)))
    have_p, have_d, _, _ = totals(groups)
    dp, dd = target[0] - have_p, target[1] - have_d
    left_p, left_d = terminate_withdrawn(groups, max(0, -dp), max(0, -dd))
    if (left_p or left_d) and hard:
        terminate.append(ScaleRequest(shape, -left_p, -left_d, tuple(g.current() for g in groups), ratio))
        left_p = left_d = 0
    elif (left_p or left_d) and (also_starting or not only_withdrawn):  # a soft cut of starting replicas
        left_p, left_d = cut_starting(groups, left_p, left_d, ratio)
    kept = bool(left_p or left_d)
    if dp > 0 or dd > 0:
        out.append(ScaleRequest(shape, max(0, dp), max(0, dd), tuple(g.current() for g in groups), ratio))
    have_p, have_d, held_p, held_d = totals(groups)
    # a withdrawal takes the groups down to the decision's end point (target - withdraw), never past what they
    # hold: a target kept above them (a requester waiting for a preemption) asked more than they could give
    withdraw = (min(withdraw[0], max(0, have_p - (target[0] - withdraw[0]))),
                min(withdraw[1], max(0, have_d - (target[1] - withdraw[1]))))
    if (held_p, held_d) != withdraw:
        if withdraw[0] < held_p or withdraw[1] < held_d:  # restore (all), then withdraw afresh if still asked
            for g in groups:
                g.withdrawn_prefill = g.withdrawn_decode = 0
            held_p = held_d = 0
        more_p, more_d = withdraw[0] - held_p, withdraw[1] - held_d
        if more_p or more_d:
            routable = tuple(r for r in (g.routable() for g in groups) if r.num_prefill or r.num_decode)
            withdrawing.append(ScaleRequest(shape, -more_p, -more_d, routable,
                                            ratio if withdraw_ratio is None else withdraw_ratio))
    return out, terminate, withdrawing, kept


class FreeIndex:
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


def room(index: FreeIndex, shape: ServiceShape, groups: Sequence[WorkingGroup], prefill: int, decode: int) -> bool:
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
