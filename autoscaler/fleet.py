"""Fleet arbitration inside the control cycle (`autoscaler.cycle`): the GPU budget left for a cycle's
scale-outs, and whole-group preemption. Pure, like the cycle.

One cycle decides and places every service of a fleet over one cluster view, so two services never plan into
the same free GPUs: `place()` serves scale-outs by priority (equal priorities by how little of their ask they
hold) and charges each against the fleet's GPU budget, total and per GPU type (`budget_left`), so the budget is
never exceeded by growth.

Preemption: a scale-out that found no room (no free GPUs, or no budget) may take whole deployment groups (DGs)
of strictly lower-priority services:
- candidates are the lower-priority services' groups on GPU types the requester can use, lowest priority first,
  then the group closest in size to what is short; never a group of a service in advisory mode or in a soft
  scale-in (its capacity is being freed already), never one that would leave its service below its floor
  (`PolicyConfig.fleet_floor`: (0, 0) for a best-effort service);
- the fewest of them (in that order) whose GPUs, returned to the cluster view and the budget, let `place()`
  place what is short (else those that place the most), each kept only if it is needed;
- a chosen group is withdrawn whole (both roles leave routing at once: a group never keeps one role), then
  removed once `FleetConfig.preempt_drain_s` has passed and nothing in it serves (at least one control period
  later; requests in flight finish as the world's termination drains them); its service's targets fall to what
  it keeps, and its policy asks its minimum back (reason RECLAIM) where a higher priority leaves room;
- while a requester's preemption is in progress no other is started for it, and its policy's target is kept
  (not set back to what was placed), so the next cycle after the removal places it first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Sequence

from autoscaler.model import PolicyConfig, PolicyState, Preemption
from common.vocab import DeploymentGroup
from placement.scheduler import ScaleRequest, ServiceShape, Unplaced, Why, place
from placement.topology import Budget, TopologyTree

if TYPE_CHECKING:
    from autoscaler.cycle import ClusterView, CycleConfig
    from autoscaler.plan import WorkingGroup

#: unplaced scale-outs that preemption can help (not: no domain has the types, an invalid request)
PREEMPTIBLE_WHY = (Why.NO_CAPACITY, Why.BUDGET)


def group_gpus(group: DeploymentGroup, shape: ServiceShape | None) -> dict[str, int]:
    """GPUs per type a group holds (an MoE prefill's type is "attn/ffn")."""
    out: dict[str, int] = {}

    def add(gpu_type: str, gpus: int) -> None:
        if gpus:
            out[gpu_type] = out.get(gpu_type, 0) + gpus

    moe = shape.moe if shape is not None else None
    if moe is not None and "/" in group.prefill_gpu_type:
        attn, ffn = group.prefill_gpu_type.split("/", 1)
        add(attn, group.num_prefill * moe.attn_per_prefill * moe.gpus_per_attn)
        add(ffn, group.num_prefill * moe.ffn_per_prefill * moe.gpus_per_ffn)
    else:
        add(group.prefill_gpu_type, group.num_prefill * (shape.gpus_per_prefill if shape else 1))
    add(group.decode_gpu_type, group.num_decode * (shape.gpus_per_decode if shape else 1))
    return out


def budget_left(view: ClusterView, config: CycleConfig) -> Budget | None:
    """The fleet's GPU budget less what every service's groups hold (starting and withdrawn included); None
    when the fleet sets none. Can be negative (a budget lowered below what runs): nothing grows then."""
    fleet = config.fleet
    if fleet.gpu_budget is None and not fleet.gpu_budget_by_type:
        return None
    used: dict[str, int] = {}
    for service, groups in view.groups.items():
        for gs in groups:
            for gpu_type, gpus in group_gpus(gs.group, config.shapes.get(service)).items():
                used[gpu_type] = used.get(gpu_type, 0) + gpus
    return Budget({t: cap - used.get(t, 0) for t, cap in fleet.gpu_budget_by_type.items()},
                  None if fleet.gpu_budget is None else fleet.gpu_budget - sum(used.values()))


def in_progress(state: PolicyState, view: ClusterView) -> dict[tuple[str, str], Preemption]:
    """The preemptions whose group the view still holds, by (service, group)."""
    held = {(service, gs.name) for service, groups in view.groups.items() for gs in groups}
    return {(p.service, p.group): p for p in state.preemptions if (p.service, p.group) in held}


def _with_released(tree: TopologyTree, released: Sequence[tuple[DeploymentGroup, ServiceShape | None]]
                   ) -> TopologyTree:
    """A copy of `tree` (its free GPUs and budget as this cycle left them) with the groups' GPUs returned to
    their domain's nodes of each type and to the budget."""
    budget = tree.budget
    # the same fleet's structure (shared, read-only), its own free GPUs and budget
    copy = replace(tree, free=dict(tree.free),
                   budget=None if budget is None else Budget(dict(budget.by_type), budget.total))
    for group, shape in released:
        gpus_by_type = group_gpus(group, shape)
        domain = copy.domains.get((group.scope, group.domain))
        for gpu_type, gpus in gpus_by_type.items():
            for node in sorted(domain.by_type.get(gpu_type, ()) if domain else (), key=lambda n: n.node_id):
                back = min(gpus, node.total_gpus - copy.free[node.node_id])
                copy.free[node.node_id] += back
                gpus -= back
        if copy.budget is not None:
            for gpu_type, gpus in gpus_by_type.items():
                if gpu_type in copy.budget.by_type:
                    copy.budget.by_type[gpu_type] += gpus
            if copy.budget.total is not None:
                copy.budget.total += sum(gpus_by_type.values())
    return copy


def choose_victims(tree: TopologyTree, request: ScaleRequest, short: Unplaced,
                   working: Mapping[str, Mapping[str, WorkingGroup]], policies: Mapping[str, PolicyConfig],
                   shapes: Mapping[str, ServiceShape], state: PolicyState, taken: set[tuple[str, str]]
                   ) -> list[tuple[str, str]]:
    """The (service, group) pairs to preempt for `request`'s unplaced part `short` (see the module docstring);
    empty when nothing lower in priority would make room. `taken`: groups already being preempted."""
    mine = policies[request.service.name]
    types = set(request.service.prefill_gpu_types) | set(request.service.decode_gpu_types)
    if request.service.moe is not None:
        types |= set(request.service.moe.attn_gpu_types) | set(request.service.moe.ffn_gpu_types)
    need = short.num_prefill * request.service.gpus_per_prefill + short.num_decode * request.service.gpus_per_decode
    pool = []
    for service, groups in working.items():
        cfg, st = policies.get(service), state.services.get(service)
        if cfg is None or cfg.priority >= mine.priority or cfg.advisory or (st is not None and st.soft is not None):
            continue
        for g in groups.values():
            if (service, g.base.name) in taken or not (g.num_prefill and g.num_decode):
                continue
            gpus = group_gpus(g.current(), shapes.get(service))
            if types & set(t for key in gpus for t in key.split("/")):
                pool.append((cfg.priority, abs(sum(gpus.values()) - need), service, g.base.name))
    keeps = {s: [sum(g.num_prefill for k, g in working[s].items() if (s, k) not in taken),
                 sum(g.num_decode for k, g in working[s].items() if (s, k) not in taken)] for s in working}
    candidates = []
    for _, _, service, name in sorted(pool):  # every prefix keeps each service at its floor or above
        g, floor = working[service][name], policies[service].fleet_floor()
        left = (keeps[service][0] - g.num_prefill, keeps[service][1] - g.num_decode)
        if floor != (0, 0) and (left[0] < floor[0] or left[1] < floor[1]):
            continue
        keeps[service] = list(left)
        candidates.append((service, name))
    if not candidates:
        return []
    asked = short.num_prefill + short.num_decode
    ask = replace(request, delta_prefill=short.num_prefill, delta_decode=short.num_decode)

    def placed(chosen: Sequence[tuple[str, str]]) -> int:
        trial = _with_released(tree, [(working[s][n].current(), shapes.get(s)) for s, n in chosen])
        left = sum(u.num_prefill + u.num_decode for u in place(trial, [ask]).unplaced)
        return asked - left

    best = placed(candidates)
    if best <= 0:
        return []
    lo, hi = 1, len(candidates)  # the shortest prefix that places as much as all of them do
    while lo < hi:
        mid = (lo + hi) // 2
        if placed(candidates[:mid]) >= best:
            hi = mid
        else:
            lo = mid + 1
    chosen = candidates[:lo]
    for victim in list(reversed(chosen))[:32]:  # each kept only if it is needed
        rest = [c for c in chosen if c != victim]
        if rest and placed(rest) >= best:
            chosen = rest
    return chosen
