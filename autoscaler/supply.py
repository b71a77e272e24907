"""Node supply: what the controller asks the cluster autoscaler for (the paper's pre-scheduler asking the
infrastructure for resources). Pure: no Ray, clock, environment or I/O; `placement.ray_adapter` sends the request.

Ray's autoscaler v2 takes `request_resources(bundles, bundle_label_selectors)` as a floor on the cluster's shape
(total resources, whatever is in use) that replaces the previous request. So the request is the service's whole
target shape: one bundle per instance its DGs hold after this cycle, pinned to the DG's domain and GPU type, plus
the part of a scale-out that did not fit anywhere, placed by the same `place()` onto the nodes the configured
node types could still add (a virtual tree: the real nodes full, the supplied ones empty). A batch that needs a
new DG is requested whole in one domain (both roles), so the nodes that join can hold the whole group; the next
cycle's `place()` sees them and the all-or-nothing probe creates the DG — never half a group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from autoscaler.cycle import ClusterView, CycleResult, GroupActionKind
from common.vocab import DeploymentGroup, NodeInfo, pinned_bundles
from placement.scheduler import ActionKind, PlacementAction, ScaleRequest, SchedulerConfig, ServiceShape, Unplaced, place
from placement.topology import build_tree


@dataclass(frozen=True)
class SupplyNodeType:
    """A node type the cluster autoscaler can add: its GPUs (type and count), its domains, and how many nodes
    with these labels the cluster may hold at most (counting those already there)."""

    gpu_type: str
    num_gpus: int
    s1: str
    s2: str
    max_nodes: int

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.max_nodes < 0:
            raise ValueError(f"node type {self.gpu_type}/{self.s1}: num_gpus ({self.num_gpus}) must be >= 1 and "
                             f"max_nodes ({self.max_nodes}) >= 0")


@dataclass(frozen=True)
class SupplyPlan:
    bundles: tuple[Mapping[str, float], ...] = ()  # the service's whole target shape, one bundle per instance
    selectors: tuple[Mapping[str, str], ...] = ()  # one label selector per bundle
    added: tuple[PlacementAction, ...] = ()  # where what did not fit would go on supplied nodes
    unmet: tuple[Unplaced, ...] = ()  # what no supplied node type could hold either

    def summary(self) -> dict:
        return {"instances": len(self.bundles),
                "added": [{"domain": a.domain, "kind": a.kind.value, "num_prefill": a.num_prefill,
                           "num_decode": a.num_decode} for a in self.added],
                "unmet": [{"num_prefill": u.num_prefill, "num_decode": u.num_decode, "detail": u.detail}
                          for u in self.unmet]}


def groups_after(service: str, view: ClusterView, result: CycleResult) -> list[DeploymentGroup]:
    """The service's DGs (targets) once this cycle's actions are applied."""
    groups = {gs.name: gs.group for gs in view.groups.get(service, ())}
    for action in result.actions:
        if action.service != service or action.advisory:
            continue
        if action.kind is GroupActionKind.REMOVE:
            groups.pop(action.group.name, None)
        else:
            groups[action.group.name] = action.group
    return [groups[name] for name in sorted(groups)]


def supplied_nodes(nodes: Sequence[NodeInfo], node_types: Sequence[SupplyNodeType]) -> list[NodeInfo]:
    """The nodes each type could still add (max_nodes less the nodes with its labels and size), all GPUs free."""
    out = []
    for t in node_types:
        present = sum(1 for n in nodes if (n.gpu_type, n.s1, n.s2, n.total_gpus) == (t.gpu_type, t.s1, t.s2, t.num_gpus))
        out += [NodeInfo(f"supply:{t.gpu_type}:{t.s1}:{i}", t.gpu_type, t.num_gpus, t.num_gpus, t.s1, t.s2)
                for i in range(max(0, t.max_nodes - present))]
    return out


def plan_supply(service: str, view: ClusterView, result: CycleResult, shape: ServiceShape,
                node_types: Sequence[SupplyNodeType], scheduler: SchedulerConfig = SchedulerConfig()) -> SupplyPlan:
    """The whole target shape to request for `service` after `result` (see the module docstring)."""
    groups = groups_after(service, view, result)
    bundles: list[dict[str, float]] = []
    selectors: list[dict[str, str]] = []
    for g in groups:
        b, s = pinned_bundles(g.scope, g.domain,
                              ((g.prefill_gpu_type or shape.prefill_types[0], g.num_prefill, shape.gpus_per_prefill),
                               (g.decode_gpu_type or shape.decode_types[0], g.num_decode, shape.gpus_per_decode)))
        bundles += b
        selectors += s
    short_p = sum(max(0, u.num_prefill) for u in result.unplaced if u.service == service)
    short_d = sum(max(0, u.num_decode) for u in result.unplaced if u.service == service)
    if not (short_p or short_d):
        return SupplyPlan(tuple(bundles), tuple(selectors))
    # The real nodes count as full: what did not fit there goes onto nodes the node types can add.
    virtual = [replace(n, free_gpus=0) for n in view.nodes] + supplied_nodes(view.nodes, node_types)
    placement = place(build_tree(virtual), [ScaleRequest(shape, short_p, short_d, tuple(groups))], scheduler)
    added = tuple(a for a in placement.actions if a.kind in (ActionKind.GROW, ActionKind.CREATE))
    for a in added:
        b, s = pinned_bundles(a.scope, a.domain, ((a.prefill_gpu_type, a.num_prefill, shape.gpus_per_prefill),
                                                  (a.decode_gpu_type, a.num_decode, shape.gpus_per_decode)))
        bundles += b
        selectors += s
    return SupplyPlan(tuple(bundles), tuple(selectors), added, placement.unplaced)
