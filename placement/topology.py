"""Topology tree (cluster -> S2 -> S1 -> node) and RDMA-subgroup tiers, built from node facts.

Pure: no Ray (the Ray adapter turns `ray.nodes()` into `common.vocab.NodeInfo`s), no clock, no environment.

Tiers (paper §5.4), from least to most precious:
- LOW:    an S2 whose GPUs are all one type (S2-homogeneous);
- MEDIUM: an S2 with several GPU types whose every S1 is homogeneous (S2-heterogeneous);
- HIGH:   an S1 that directly connects different GPU types (S1-heterogeneous).
An S1 domain takes the tier HIGH if it is heterogeneous, else the tier of its S2. An S2 domain that contains an
S1-heterogeneous switch is HIGH as a whole (using it consumes that capacity). The cluster scope is LOW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from itertools import compress
from operator import is_not
from types import MappingProxyType
from typing import Iterable, Mapping

from common.vocab import CLUSTER_DOMAIN, NodeInfo, Scope


class Tier(IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2


@dataclass(frozen=True, eq=False)
class Domain:
    """A network domain at one scope: its nodes, by GPU type. Structure only, shared by every tree built over
    the same fleet; the free GPUs are the tree's (`TopologyTree.free`, `TopologyTree.free_gpus`)."""

    scope: str
    name: str
    tier: Tier
    nodes: tuple[NodeInfo, ...]
    by_type: Mapping[str, tuple[NodeInfo, ...]]
    ids_by_type: Mapping[str | None, tuple[str, ...]]  # node ids per GPU type, and all of them under None

    def gpu_types(self) -> set[str]:
        return set(self.by_type)


@dataclass
class Budget:
    """GPUs a scheduling cycle may still take, per GPU type (a type not named: no cap) and in total (None: no
    cap). The scheduler charges every scale-out it commits, so later requests of the cycle see what is left."""

    by_type: dict[str, int] = field(default_factory=dict)
    total: int | None = None
    refused: int = 0  # fits with room that the budget turned down (the scheduler's reason for what is left)

    def most(self, gpu_type: str, gpus_each: int) -> int:
        """How many more instances of `gpus_each` GPUs on `gpu_type` the budget allows."""
        caps = [v for v in (self.by_type.get(gpu_type), self.total) if v is not None]
        return min(caps) // gpus_each if caps else 1 << 30

    def fits(self, need: Mapping[str, int]) -> bool:
        if self.total is not None and sum(need.values()) > self.total:
            return False
        return all(self.by_type.get(t, n) >= n for t, n in need.items())

    def take(self, need: Mapping[str, int]) -> None:
        for t, n in need.items():
            if t in self.by_type:
                self.by_type[t] -= n
        if self.total is not None:
            self.total -= sum(need.values())


@dataclass
class TopologyTree:
    nodes: dict[str, NodeInfo]
    s1_parent: dict[str, str]  # S1 -> S2
    domains: Mapping[tuple[str, str], Domain]  # (scope, name) -> Domain (read-only, shared with other trees)
    free: dict[str, int]
    budget: Budget | None = None  # the fleet's GPU budget left (set by the caller); None: only free GPUs limit

    def domain(self, scope: str, name: str) -> Domain:
        try:
            return self.domains[(scope, name)]
        except KeyError:
            known = sorted(n for s, n in self.domains if s == scope)
            raise KeyError(f"no {scope} domain {name!r} (known: {known[:20]})") from None

    def free_gpus(self, domain: Domain, gpu_type: str | None = None) -> int:
        """Free GPUs (as virtually allocated so far) on the domain's nodes, of `gpu_type` only if given."""
        return sum(map(self.free.__getitem__, domain.ids_by_type.get(gpu_type, ())))

    def domains_at(self, scope: str) -> list[Domain]:
        return [d for (s, _), d in self.domains.items() if s == scope]

    def tiers(self) -> dict[tuple[str, str], Tier]:
        return {key: d.tier for key, d in self.domains.items()}


_SHAPES: dict[tuple, tuple] = {}  # the last few fleets' domain structure (it changes far less than free GPUs)
# The last nodes seen, their structure and their free GPUs: one tuple, read once and replaced whole, so threads
# building trees at once each see a consistent triple (the last writer's stays)
_LAST: tuple = ((), None, {})


def _static(n: NodeInfo) -> tuple:
    """What a node's place in the structure depends on (not its free GPUs)."""
    return n.node_id, n.gpu_type, n.total_gpus, n.s1, n.s2


def build_tree(nodes: Iterable[NodeInfo]) -> TopologyTree:
    """Group nodes into S1/S2/cluster domains and classify each domain's tier. Raises on inconsistent labels.
    The structure is reused while the nodes' ids, types, sizes and domains stay the same, and free GPUs are
    read afresh from the nodes that are not the very objects seen last time (a control loop replaces only the
    nodes whose free GPUs moved): on a 3,200-node fleet a cycle touches a few nodes, not all of them."""
    global _LAST
    nodes = tuple(nodes)
    last_nodes, last_shape, last_free = _LAST
    moved = None
    if nodes is last_nodes:  # the very tuple seen last time: nothing moved
        moved = []
    elif len(last_nodes) == len(nodes):
        changed = list(compress(range(len(nodes)), map(is_not, nodes, last_nodes)))
        if all(_static(nodes[i]) == _static(last_nodes[i]) for i in changed):
            moved = [nodes[i] for i in changed]
    if moved is not None:
        shape, free = last_shape, last_free  # the same fleet as last time (only free GPUs moved)
        if moved:
            free = dict(free)
            for n in moved:
                free[n.node_id] = n.free_gpus
    else:
        key = tuple(map(_static, nodes))
        shape = _SHAPES.get(key)
        if shape is None:
            if len(_SHAPES) >= 4:
                _SHAPES.pop(next(iter(_SHAPES)))
            shape = _SHAPES[key] = _shape(nodes)
        free = {n.node_id: n.free_gpus for n in nodes}
    _LAST = (nodes, shape, free)
    by_id, s1_parent, domains = shape
    # the tree's own free map (the scheduler allocates on it virtually); the one kept stays as read
    return TopologyTree(nodes=by_id, s1_parent=s1_parent, domains=domains, free=dict(free))


def _shape(nodes: tuple[NodeInfo, ...]) -> tuple:
    by_id: dict[str, NodeInfo] = {}
    s1_parent: dict[str, str] = {}
    s1_nodes: dict[str, list[NodeInfo]] = {}
    s2_nodes: dict[str, list[NodeInfo]] = {}
    for node in nodes:
        if node.node_id in by_id:
            raise ValueError(f"duplicate node id {node.node_id!r}")
        by_id[node.node_id] = node
        parent = s1_parent.setdefault(node.s1, node.s2)
        if parent != node.s2:
            raise ValueError(f"S1 {node.s1!r} is under two S2s ({parent!r}, {node.s2!r}) (node {node.node_id})")
        s1_nodes.setdefault(node.s1, []).append(node)
        s2_nodes.setdefault(node.s2, []).append(node)
    hetero_s1 = {s1 for s1, ns in s1_nodes.items() if len({n.gpu_type for n in ns}) > 1}
    s2_tier: dict[str, Tier] = {}
    for s2, ns in s2_nodes.items():
        if any(s1 in hetero_s1 for s1 in {n.s1 for n in ns}):
            s2_tier[s2] = Tier.HIGH
        elif len({n.gpu_type for n in ns}) > 1:
            s2_tier[s2] = Tier.MEDIUM
        else:
            s2_tier[s2] = Tier.LOW
    parts = [(Scope.S1, s1, Tier.HIGH if s1 in hetero_s1 else s2_tier[s1_parent[s1]], ns) for s1, ns in s1_nodes.items()]
    parts += [(Scope.S2, s2, s2_tier[s2], ns) for s2, ns in s2_nodes.items()]
    parts.append((Scope.CLUSTER, CLUSTER_DOMAIN, Tier.LOW, list(by_id.values())))
    domains = {}
    for scope, name, tier, members in parts:
        by_type: dict[str, list[NodeInfo]] = {}
        for node in members:
            by_type.setdefault(node.gpu_type, []).append(node)
        ids = {t: tuple(n.node_id for n in ns) for t, ns in by_type.items()}
        ids[None] = tuple(n.node_id for n in members)
        domains[(scope, name)] = Domain(scope, name, tier, tuple(members),
                                        MappingProxyType({t: tuple(ns) for t, ns in by_type.items()}),
                                        MappingProxyType(ids))
    return by_id, s1_parent, MappingProxyType(domains)
