"""One scheduling cycle: where each P/D batch goes (paper §5.6). Pure: no Ray, clock or environment.

`place(tree, requests, config) -> Placement`. Requests are served by service priority, equal priorities the least
served first (the share of its ask a service already holds), then by name; scale-outs are charged against
`tree.budget` (the fleet's GPU budget left, per type and in total) where the caller set one. With a
request's `prefill_per_decode`, every group stays inside that ratio's band (`prefill_band`): KV never leaves a
group, so a group's surplus of one role idles; deltas are split across groups or open new ones, scale-in takes
from the groups that are over. A scale-out batch is placed whole in one domain (grow an existing deployment
group there, or open a new one), or split into at most `config.max_batch_splits` sub-batches that are each whole
(never a prefill without its decode).
Candidates are ranked by (RDMA-subgroup tier, GPU-type fallback rank, grow before create, free GPUs left in the
domain, name): the least precious tier that satisfies the service first, then the preferred GPU types, then an
existing group of the service over a new one (a service split over more groups than it needs runs small groups:
more GPUs for the same tail, docs/design.md), then the most-filled domain (limits fragmentation). Chosen GPUs are
reserved in the tree at once, so later requests of the same cycle see the reduced capacity. Scale-in shrinks the
service's groups in the most precious tiers first; freed GPUs are not returned to the tree until the next cycle
rebuilds it.

Disaggregated MoE: with `ServiceShape.moe`, a prefill instance is `attn_per_prefill` ATTN + `ffn_per_prefill`
FFN instances that must share one S1, while the whole DG shares one S2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable, Sequence

from common.vocab import CLUSTER_DOMAIN, DeploymentGroup, Scope
from placement.topology import Domain, Tier, TopologyTree


@dataclass(frozen=True)
class MoeShape:
    attn_per_prefill: int
    ffn_per_prefill: int
    attn_gpu_types: tuple[str, ...]
    ffn_gpu_types: tuple[str, ...]
    gpus_per_attn: int = 1
    gpus_per_ffn: int = 1


@dataclass(frozen=True)
class ServiceShape:
    name: str
    prefill_gpu_types: tuple[str, ...]  # preferred first, then fallbacks
    decode_gpu_types: tuple[str, ...]
    affinity: str = Scope.S1  # s1 | s2 | cluster
    priority: int = 0
    gpus_per_prefill: int = 1
    gpus_per_decode: int = 1
    moe: MoeShape | None = None

    def __post_init__(self) -> None:
        if self.affinity not in (Scope.S1, Scope.S2, Scope.CLUSTER):
            raise ValueError(f"service {self.name}: affinity ({self.affinity!r}) must be s1, s2 or cluster")
        if not self.prefill_gpu_types or not self.decode_gpu_types:
            raise ValueError(f"service {self.name}: prefill_gpu_types and decode_gpu_types must not be empty")
        if self.moe is not None and self.affinity != Scope.S2:
            raise ValueError(f"service {self.name}: a disaggregated-MoE service needs affinity 's2' (ATTN+FFN share "
                             f"an S1, the P/D pair an S2), got {self.affinity!r}")


@dataclass(frozen=True)
class ScaleRequest:
    service: ServiceShape
    delta_prefill: int  # > 0 scale out, < 0 scale in
    delta_decode: int
    groups: tuple[DeploymentGroup, ...] = ()  # the service's existing DGs
    prefill_per_decode: float | None = None  # every group stays inside this ratio's band (`prefill_band`); None: none


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_splits: int = 8  # sub-batches one scale-out may be cut into when no domain fits it whole

    def __post_init__(self) -> None:
        if self.max_batch_splits < 1:
            raise ValueError(f"max_batch_splits ({self.max_batch_splits}) must be >= 1")


class ActionKind(str, Enum):
    GROW = "grow"
    CREATE = "create"
    SHRINK = "shrink"
    REMOVE = "remove"


class Why(str, Enum):
    LOWEST_TIER = "lowest_tier"  # placed in the least precious tier that satisfies the service
    SPLIT = "split"  # no domain fits the whole batch; placed as several whole sub-batches
    PAIRED = "paired"  # one role's growth no group could take: a new group, with one of the other role
    SCALE_IN_PRECIOUS_FIRST = "scale_in_precious_first"
    STARTING_FIRST = "starting_first"  # a scale-in cancels replicas still starting, each group only its own
    STUCK = "stuck"  # replicas not Ready past the world's bound were cancelled (the cycle places them again)
    NO_DOMAIN_WITH_TYPES = "no_domain_with_types"  # no domain at the service's scope has both roles' GPU types
    NO_CAPACITY = "no_capacity"  # domains with the types exist, but none has room now
    BUDGET = "budget"  # a domain had room, but the fleet's GPU budget (total or for a GPU type) did not
    INVALID_REQUEST = "invalid_request"
    NOTHING_TO_REMOVE = "nothing_to_remove"


@dataclass(frozen=True)
class PlacementAction:
    kind: ActionKind
    service: str
    group: str
    scope: str
    domain: str
    tier: Tier
    prefill_gpu_type: str
    decode_gpu_type: str
    num_prefill: int  # added (grow/create) or removed (shrink/remove)
    num_decode: int
    node_gpus: tuple[tuple[str, str, int], ...] = ()  # (role, node_id, gpus) reserved for added instances
    why: Why = Why.LOWEST_TIER
    detail: str = ""


@dataclass(frozen=True)
class Unplaced:
    service: str
    num_prefill: int
    num_decode: int
    why: Why
    detail: str


@dataclass(frozen=True)
class Placement:
    actions: tuple[PlacementAction, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()


# ---- node-level allocation on a scratch copy of the free map ---------------------------------------------------


def _take(domain: Domain, free: dict[str, int], gpu_type: str, count: int, gpus_each: int, role: str,
          out: list[tuple[str, str, int]]) -> bool:
    """Best-fit `count` instances of `gpus_each` GPUs on `gpu_type` nodes of the domain (one node each)."""
    if count == 0:
        return True
    candidates = [n for n in domain.by_type.get(gpu_type, ()) if free[n.node_id] >= gpus_each]
    if sum(free[n.node_id] // gpus_each for n in candidates) < count:
        return False
    nodes = sorted(candidates, key=lambda n: (free[n.node_id], n.node_id))
    placed = 0
    for node in nodes:
        while placed < count and free[node.node_id] >= gpus_each:
            free[node.node_id] -= gpus_each
            out.append((role, node.node_id, gpus_each))
            placed += 1
        if placed == count:
            return True
    return False


def _take_moe_prefill(tree: TopologyTree, domain: Domain, free: dict[str, int], moe: MoeShape, count: int,
                      out: list[tuple[str, str, int]]) -> str | None:
    """Each MoE prefill = ATTN + FFN instances inside one S1 of the S2 domain. Returns 'attn/ffn' types or None."""
    s1s = sorted({n.s1 for n in domain.nodes})
    chosen = None
    for _ in range(count):
        done = False
        for s1 in sorted(s1s, key=lambda s: (tree.free_gpus(tree.domain(Scope.S1, s)), s)):
            sub = tree.domain(Scope.S1, s1)
            for attn_type in moe.attn_gpu_types:
                for ffn_type in moe.ffn_gpu_types:
                    trial, trial_out = dict(free), []
                    if _take(sub, trial, attn_type, moe.attn_per_prefill, moe.gpus_per_attn, "attn", trial_out) \
                            and _take(sub, trial, ffn_type, moe.ffn_per_prefill, moe.gpus_per_ffn, "ffn", trial_out):
                        free.update(trial)
                        out.extend(trial_out)
                        chosen = chosen or f"{attn_type}/{ffn_type}"
                        done = True
                        break
                if done:
                    break
            if done:
                break
        if not done:
            return None
    return chosen or "-"


@dataclass
class _Fit:
    domain: Domain
    group: DeploymentGroup | None
    prefill_type: str
    decode_type: str
    fallback_rank: int
    alloc: list[tuple[str, str, int]] = field(default_factory=list)
    free_after: int = 0
    scratch: dict[str, int] = field(default_factory=dict)  # the tree's free map after this allocation


def _capacity(domain: Domain, gpu_type: str, gpus_each: int, free: dict[str, int]) -> int:
    ids = domain.ids_by_type.get(gpu_type, ())
    if gpus_each == 1:
        return sum(map(free.__getitem__, ids))
    return sum(f // gpus_each for f in map(free.__getitem__, ids))


def _need(tree: TopologyTree, svc: ServiceShape, p: int, d: int, ptype: str, dtype: str,
          alloc: Sequence[tuple[str, str, int]] = ()) -> dict[str, int]:
    """GPUs per type a batch takes: from its allocation where there is one (MoE), else from its counts."""
    need: dict[str, int] = {}
    if alloc:
        for _, node_id, gpus in alloc:
            t = tree.nodes[node_id].gpu_type
            need[t] = need.get(t, 0) + gpus
        return need
    for gpu_type, gpus in ((ptype, p * svc.gpus_per_prefill), (dtype, d * svc.gpus_per_decode)):
        if gpus:
            need[gpu_type] = need.get(gpu_type, 0) + gpus
    return need


def _within_budget(tree: TopologyTree, fit: _Fit, svc: ServiceShape, p: int, d: int) -> bool:
    if tree.budget is None or tree.budget.fits(_need(tree, svc, p, d, fit.prefill_type, fit.decode_type, fit.alloc)):
        return True
    tree.budget.refused += 1
    return False


def _allocate(tree: TopologyTree, domain: Domain, svc: ServiceShape, p: int, d: int, ptype: str, dtype: str
              ) -> tuple[dict[str, int], list[tuple[str, str, int]]] | None:
    """Reserve on a scratch copy of the domain's free counts; None if the batch does not fit."""
    free, alloc = {n.node_id: tree.free[n.node_id] for n in domain.nodes}, []
    if svc.moe is not None:
        ok = _take_moe_prefill(tree, domain, free, svc.moe, p, alloc) is not None
    else:
        ok = _take(domain, free, ptype, p, svc.gpus_per_prefill, "prefill", alloc)
    if ok and _take(domain, free, dtype, d, svc.gpus_per_decode, "decode", alloc):
        return free, alloc
    return None


def _try(tree: TopologyTree, domain: Domain, svc: ServiceShape, p: int, d: int, prefill_types: Iterable[str],
         decode_types: Iterable[str], group: DeploymentGroup | None) -> _Fit | None:
    """The best GPU-type pair (by preference) for which the batch fits in the domain.

    Instances of one size on one GPU type fit iff `sum(free // gpus)` over the type's nodes covers them, so for
    roles on different types, or on one type with one instance size, no trial allocation is needed to rank
    candidates (the winner is allocated afterwards). Mixed sizes on one type and MoE are allocated on trial."""
    here = domain.gpu_types()
    demand = p * svc.gpus_per_prefill + d * svc.gpus_per_decode
    for pi, ptype in enumerate(prefill_types):
        if svc.moe is None and ptype not in here:
            continue
        for di, dtype in enumerate(decode_types):
            if dtype not in here:
                continue
            if svc.moe is None and ptype != dtype:
                exact = (_capacity(domain, ptype, svc.gpus_per_prefill, tree.free) >= p
                         and _capacity(domain, dtype, svc.gpus_per_decode, tree.free) >= d)
            elif svc.moe is None and svc.gpus_per_prefill == svc.gpus_per_decode:  # one pool, one size
                exact = _capacity(domain, ptype, svc.gpus_per_prefill, tree.free) >= p + d
            else:
                exact = None
            if exact is not None:
                fit = _Fit(domain, group, ptype, dtype, pi + di, free_after=tree.free_gpus(domain) - demand)
                if exact and _within_budget(tree, fit, svc, p, d):
                    return fit
                continue
            trial = _allocate(tree, domain, svc, p, d, ptype, dtype)
            if trial is not None:
                free, alloc = trial
                fit = _Fit(domain, group, ptype, dtype, pi + di, alloc, sum(free.values()), free)
                if _within_budget(tree, fit, svc, p, d):
                    return fit
    return None


def prefill_band(num_decode: int, prefill_per_decode: float | None) -> tuple[int, int]:
    """The prefill counts a deployment group with `num_decode` decode instances may hold at ratio r: from
    max(1, ceil((D-1)·r)) to max(1, ceil(D·r)), so a group never holds a whole decode instance's worth of one
    role more than the other can use (KV never leaves a group: surplus prefill or decode there idles). With no
    ratio (None) any count from 1 up is in band."""
    if prefill_per_decode is None:
        return 1, _NO_LIMIT
    lo = math.ceil((num_decode - 1) * prefill_per_decode - 1e-9)
    hi = math.ceil(num_decode * prefill_per_decode - 1e-9)
    return max(1, lo), max(1, hi)


def in_band(num_prefill: int, num_decode: int, prefill_per_decode: float | None) -> bool:
    """Whether a group holding both roles is inside the ratio band (`prefill_band`)."""
    lo, hi = prefill_band(num_decode, prefill_per_decode)
    return lo <= num_prefill <= hi


def nearest_ratio_in_band(counts: Sequence[tuple[int, int]], ratio: float) -> float | None:
    """The ratio nearest `ratio` at which every (prefill, decode) group of `counts` is in band (`prefill_band`):
    a group is in band for r in ((P-1)/D, P/(D-1)] (P = 1 or D = 1 lift the respective end), so the groups
    together hold for the intersection of those intervals. `ratio` itself when it already holds; None when no ratio
    holds them all."""
    if all(in_band(p, d, ratio) for p, d in counts):
        return ratio
    lo = max([(p - 1) / d for p, d in counts if p > 1 and d > 0], default=0.0)
    hi = min([p / (d - 1) for p, d in counts if d > 1], default=math.inf)
    candidate = min(max(ratio, lo * (1 + 1e-6) + 1e-9), hi)
    if candidate <= 0 or not all(in_band(p, d, candidate) for p, d in counts):
        return None
    return candidate


_NO_LIMIT = 1 << 30


def _group_fit(tree: TopologyTree, svc: ServiceShape, group: DeploymentGroup, p: int, d: int) -> _Fit | None:
    domain = tree.domains.get((group.scope, group.domain))
    if domain is None:
        return None
    return _try(tree, domain, svc, p, d, [group.prefill_gpu_type], [group.decode_gpu_type], group)


def _batch_prefill(have_p: int, have_d: int, d: int, share: int, p_left: int, r: float | None) -> int | None:
    """Prefill to add beside `d` more decode instances in a group holding (have_p, have_d): the decode's share
    of the request's prefill, held inside the group's band; None if the band needs more than `p_left`."""
    lo, hi = prefill_band(have_d + d, r)
    p = max(0, lo - have_p, min(share, hi - have_p))
    return None if p > p_left else p


def _banded_candidates(tree: TopologyTree, svc: ServiceShape, groups: list[DeploymentGroup], d: int, share: int,
                       p_left: int, r: float | None, new_only: bool = False) -> list[tuple[_Fit, int, int]]:
    """(fit, prefill, decode) for `d` more decode instances: in each group that can take them with the prefill
    its band needs, and in each domain at the service's scope that holds none of its groups (a new group)."""
    fits = []
    if not new_only:
        for group in groups:
            p = _batch_prefill(group.num_prefill, group.num_decode, d, share, p_left, r)
            if p is None or p + d == 0:
                continue
            fit = _group_fit(tree, svc, group, p, d)
            if fit:
                fits.append((fit, p, d))
    p_new = _batch_prefill(0, 0, d, share, p_left, r)
    if d < 1 or p_new is None:  # a new group needs both roles
        return fits
    used_domains = {g.domain for g in groups}
    for domain in tree.domains_at(svc.affinity):
        if domain.name in used_domains:
            continue
        fit = _try(tree, domain, svc, p_new, d, svc.prefill_gpu_types, svc.decode_gpu_types, None)
        if fit:
            fits.append((fit, p_new, d))
    return fits


def _rank(fit: _Fit) -> tuple:
    return (int(fit.domain.tier), fit.fallback_rank, 0 if fit.group else 1, fit.free_after, fit.domain.name)


def _has_types(tree: TopologyTree, svc: ServiceShape) -> bool:
    prefill_types = set(svc.moe.attn_gpu_types) if svc.moe else set(svc.prefill_gpu_types)
    for domain in tree.domains_at(svc.affinity):
        here = domain.gpu_types()
        if here & prefill_types and here & set(svc.decode_gpu_types):
            return True
    return False


def _new_group_name(svc: ServiceShape, domain: Domain, taken: set[str]) -> str:
    base = f"{svc.name}-{domain.name if domain.name != CLUSTER_DOMAIN else 'cluster'}"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}-{i}"
    taken.add(name)
    return name


@dataclass
class _Added:
    """What one scale-out request adds to one group (merged over the request's sub-batches)."""

    fit: _Fit
    name: str
    created: bool
    num_prefill: int = 0
    num_decode: int = 0
    alloc: list[tuple[str, str, int]] = field(default_factory=list)
    why: Why = Why.LOWEST_TIER


def _scale_out(tree: TopologyTree, req: ScaleRequest, cfg: SchedulerConfig, actions: list, unplaced: list,
               taken_names: set[str]) -> None:
    """Grow groups or open new ones, every group kept inside the request's ratio band (`prefill_band`):
    0. groups outside the band (the ratio moved) first take the role they lack, at the nearest ratio to the
       request's that this growth lets them all reach (`_reachable_ratio`), which the rest is then placed at;
    1. decode, with the prefill each group's band needs beside it (up to all that is asked), whole in the
       best-ranked group or domain, else split into the largest whole sub-batches some domain holds;
    2. the prefill left over, into the groups (those below their band first, then by tier): every group to its
       band's bottom first, then to its top;
    3. growth of one role that no group can take inside its band: a new group with what its band needs of the
       other role (`Why.PAIRED`, over the target; the next cycle gives the extra back where it can)."""
    svc, r = req.service, req.prefill_per_decode
    p_left, d_left = req.delta_prefill, req.delta_decode
    groups = {g.name: g for g in req.groups}
    refused = tree.budget.refused if tree.budget is not None else 0
    added: dict[str, _Added] = {}

    def commit(fit: _Fit, p: int, d: int, why: Why) -> None:
        nonlocal p_left, d_left
        if not fit.scratch:  # exact: the capacity check said it fits
            fit.scratch, fit.alloc = _allocate(tree, fit.domain, svc, p, d, fit.prefill_type, fit.decode_type)
        tree.free.update(fit.scratch)  # virtual allocation: later requests of this cycle see it
        if tree.budget is not None:
            tree.budget.take(_need(tree, svc, p, d, fit.prefill_type, fit.decode_type, fit.alloc))
        if fit.group is not None:
            name = fit.group.name
            entry = added.setdefault(name, _Added(fit, name, False))
        else:
            name = _new_group_name(svc, fit.domain, taken_names)
            entry = added[name] = _Added(fit, name, True)
        g = groups.get(name) or DeploymentGroup(name, svc.name, fit.domain.scope, fit.domain.name,
                                                fit.prefill_type, fit.decode_type, 0, 0)
        groups[name] = replace(g, num_prefill=g.num_prefill + p, num_decode=g.num_decode + d)
        entry.num_prefill, entry.num_decode = entry.num_prefill + p, entry.num_decode + d
        entry.alloc.extend(fit.alloc)
        entry.why = why if entry.why is Why.LOWEST_TIER else entry.why
        p_left, d_left = max(0, p_left - p), max(0, d_left - d)

    why = Why.LOWEST_TIER
    if r is not None:  # 0. every group into the band of the ratio it can reach, first
        r = _reachable_ratio(tree, svc, req, r)
        for g in list(groups.values()):
            p, d = _into_band(g, r) if g.num_prefill and g.num_decode else (0, 0)
            fit = _group_fit(tree, svc, g, p, d) if p <= p_left and d <= d_left and p + d else None
            if fit is not None:
                commit(fit, p, d, why)
    # Prefill the groups below their band need to reach it (a ratio that rose) is kept for them (step 2), so
    # the decode placed first does not take it all to its own band's top.
    reserve = sum(max(0, prefill_band(g.num_decode, r)[0] - g.num_prefill) for g in req.groups) if r else 0
    for _ in range(cfg.max_batch_splits):  # 1. decode with its prefill
        if d_left == 0:
            break
        fits = _banded_candidates(tree, svc, list(groups.values()), d_left, max(0, p_left - reserve), p_left, r)
        if not fits and cfg.max_batch_splits > 1 and d_left > 1:
            lo, hi, best = 1, d_left - 1, None  # the largest whole sub-batch some domain holds
            while lo <= hi:
                mid = (lo + hi) // 2
                found = _banded_candidates(tree, svc, list(groups.values()), mid,
                                           math.ceil(mid * p_left / d_left - 1e-9), p_left, r)
                if found:
                    best, lo = found, mid + 1
                else:
                    hi = mid - 1
            fits, why = best or [], Why.SPLIT  # this and every later sub-batch of the request
        if not fits:
            break
        commit(*min(fits, key=lambda f: _rank(f[0])), why)
    if d_left and r is not None:  # decode short: only the prefill the placed decode can use is placed
        p_left = min(p_left, max(0, math.ceil(sum(g.num_decode for g in groups.values()) * r - 1e-9)
                                 - sum(g.num_prefill for g in groups.values())))
        p_short = req.delta_prefill - p_left - sum(e.num_prefill for e in added.values())
    else:
        p_short = 0

    for end in (0, 1):  # 2. leftover prefill: every group up to its band's bottom first, then to its top
        for name in sorted(groups, key=lambda n: (groups[n].num_prefill >= prefill_band(groups[n].num_decode, r)[0],
                                                  _tier_of(tree, groups[n]), n)):
            g = groups[name]
            room = min(p_left, prefill_band(g.num_decode, r)[end] - g.num_prefill)
            domain = tree.domains.get((g.scope, g.domain))
            if domain is not None and svc.moe is None:  # the most the domain (and the budget) holds, at once
                room = min(room, _capacity(domain, g.prefill_gpu_type, svc.gpus_per_prefill, tree.free))
                if tree.budget is not None:
                    room = min(room, tree.budget.most(g.prefill_gpu_type, svc.gpus_per_prefill))
            while room > 0:  # MoE prefill: the largest batch that allocates
                fit = _group_fit(tree, svc, g, room, 0)
                if fit:
                    commit(fit, room, 0, why)
                    break
                room -= 1
    pair = None
    if d_left == 0 and p_left > 0:  # 3. prefill beyond every group's band: decode beside it
        d_pair = max(1, math.ceil(p_left / r - 1e-9)) if r else 1
        pair = _banded_candidates(tree, svc, list(groups.values()), d_pair, p_left, _NO_LIMIT, r, new_only=True)
    elif d_left > 0 and p_left == 0:  # decode no group can take inside its band: prefill beside it
        pair = _banded_candidates(tree, svc, list(groups.values()), d_left, 0, _NO_LIMIT, r, new_only=True)
    if pair:
        commit(*min(pair, key=lambda f: _rank(f[0])), Why.PAIRED)
    for entry in added.values():
        fit = entry.fit
        kind = ActionKind.CREATE if entry.created else ActionKind.GROW
        actions.append(PlacementAction(kind, svc.name, entry.name, fit.domain.scope, fit.domain.name, fit.domain.tier,
                                       fit.prefill_type, fit.decode_type, entry.num_prefill, entry.num_decode,
                                       tuple(entry.alloc), entry.why,
                                       f"tier {fit.domain.tier.name}, fallback rank {fit.fallback_rank}, "
                                       f"{fit.free_after} GPUs left in domain"))
    p_left += p_short
    if p_left or d_left:
        if not _has_types(tree, svc):
            why, detail = Why.NO_DOMAIN_WITH_TYPES, (
                f"no {svc.affinity} domain has a prefill type in {list(svc.prefill_gpu_types)} and a decode type "
                f"in {list(svc.decode_gpu_types)}")
        elif tree.budget is not None and tree.budget.refused > refused:
            why, detail = Why.BUDGET, (f"the fleet's GPU budget has no room for the remaining {p_left}P+{d_left}D "
                                       f"(left: total {tree.budget.total}, by type {tree.budget.by_type})")
        else:
            why, detail = Why.NO_CAPACITY, (f"domains with the GPU types exist, but none has room for the "
                                            f"remaining {p_left}P+{d_left}D inside the groups' ratio band "
                                            f"after {len(added)} placements")
        unplaced.append(Unplaced(svc.name, p_left, d_left, why, detail))


def _into_band(g: DeploymentGroup, x: float) -> tuple[int, int]:
    """(prefill, decode) group `g` must add to sit inside the band of ratio `x`: prefill up to the band's bottom
    if it holds less, else the fewest decode whose band's top reaches the prefill it holds."""
    lo, hi = prefill_band(g.num_decode, x)
    if g.num_prefill < lo:
        return lo - g.num_prefill, 0
    d = g.num_decode
    while g.num_prefill > prefill_band(d, x)[1]:
        d += 1
    return 0, d - g.num_decode


def _reachable_ratio(tree: TopologyTree, svc: ServiceShape, req: ScaleRequest, r: float) -> float:
    """The ratio nearest `r` whose band every group can reach with this request's growth, each group adding the
    role it lacks in its own domain (inside the budget): a ratio that rose past what a full domain lets its group
    follow, or fell by more than the decode a scale-out adds can bring the prefill-heavy groups down to, is placed
    at the nearest ratio the groups can all hold instead, never at one that leaves a group outside its band (the
    rest of the growth goes to other groups or opens new ones). Between the nearest ratio the groups hold as they
    are and `r` by bisection; `r` itself when reachable, or when no one ratio holds the groups as they are."""
    groups = [g for g in req.groups if g.num_prefill and g.num_decode]
    if all(in_band(g.num_prefill, g.num_decode, r) for g in groups):
        return r
    held = nearest_ratio_in_band([(g.num_prefill, g.num_decode) for g in groups], r)
    if held is None:
        return r

    def reachable(x: float) -> bool:
        need: dict[str, int] = {}
        more_p = more_d = 0
        for g in groups:
            p, d = _into_band(g, x)
            if p == 0 and d == 0:
                continue
            more_p, more_d = more_p + p, more_d + d
            if more_p > req.delta_prefill or more_d > req.delta_decode or _group_fit(tree, svc, g, p, d) is None:
                return False
            for t, n in _need(tree, svc, p, d, g.prefill_gpu_type, g.decode_gpu_type).items():
                need[t] = need.get(t, 0) + n
        return tree.budget is None or tree.budget.fits(need)

    if reachable(r):
        return r
    # reachable a hair beyond: a ratio within prefill_band's rounding tolerance of a band's edge would let new
    # groups take one more prefill than the groups at the edge's other side hold
    beyond = 1 + 1e-7 if r > held else 1 - 1e-7
    near, far = held, r
    for _ in range(40):
        mid = (near + far) / 2
        near, far = (mid, far) if reachable(mid * beyond) else (near, mid)
    return near


def _tier_of(tree: TopologyTree, g: DeploymentGroup) -> Tier:
    domain = tree.domains.get((g.scope, g.domain))
    return domain.tier if domain else Tier.LOW


def _scale_in(tree: TopologyTree, req: ScaleRequest, actions: list, unplaced: list) -> None:
    """Take from the most precious tier first, every surviving group kept inside the ratio band:
    0. whole groups while what is asked covers them (fewest decode first within a tier);
    1. decode one at a time from the first group that can give it up with the prefill its band then sheds
       (groups below their band's bottom first);
    2. prefill from the groups over their band's top first, then from the others' room above their bottom."""
    r = req.prefill_per_decode
    p_left, d_left = -req.delta_prefill, -req.delta_decode
    order = sorted(req.groups, key=lambda g: (-int(_tier_of(tree, g)), g.num_decode, g.name))
    have = {g.name: [g.num_prefill, g.num_decode] for g in order}
    for g in order:
        if (p_left or d_left) and p_left >= g.num_prefill and d_left >= g.num_decode:
            p_left, d_left = p_left - g.num_prefill, d_left - g.num_decode
            have[g.name] = [0, 0]
    while d_left > 0:
        # groups below their band (more decode than their prefill feeds: a ratio that rose) give decode first
        for g in sorted(order, key=lambda g: have[g.name][0] >= prefill_band(have[g.name][1], r)[0]):
            p, d = have[g.name]
            if d >= 2:
                shed = max(0, p - prefill_band(d - 1, r)[1])
                if shed <= p_left:
                    have[g.name] = [p - shed, d - 1]
                    p_left, d_left = p_left - shed, d_left - 1
                    break
        else:
            break
    for over_only in (True, False):
        for g in order:
            p, d = have[g.name]
            if p_left == 0 or d == 0:
                continue
            lo, hi = prefill_band(d, r)
            take = min(p_left, max(0, p - hi) if over_only else max(0, p - lo))
            have[g.name][0] -= take
            p_left -= take
    for g in order:
        p, d = have[g.name]
        if (p, d) == (g.num_prefill, g.num_decode):
            continue
        kind = ActionKind.REMOVE if (p, d) == (0, 0) else ActionKind.SHRINK
        tier = _tier_of(tree, g)
        actions.append(PlacementAction(kind, g.service, g.name, g.scope, g.domain, tier, g.prefill_gpu_type,
                                       g.decode_gpu_type, g.num_prefill - p, g.num_decode - d, (),
                                       Why.SCALE_IN_PRECIOUS_FIRST, f"tier {tier.name} first"))
    if p_left or d_left:
        unplaced.append(Unplaced(req.service.name, -p_left, -d_left, Why.NOTHING_TO_REMOVE,
                                 "the service's groups cannot give up more without emptying one role of a group "
                                 "or leaving its ratio band"))


def _held_share(req: ScaleRequest) -> float:
    """Of what a scale-out's service would hold, the share it holds already: equal priorities are served least
    served first (they share by demand); 0 for other requests."""
    if req.delta_prefill <= 0 and req.delta_decode <= 0:
        return 0.0
    held = sum(g.num_prefill + g.num_decode for g in req.groups)
    return held / (held + max(0, req.delta_prefill) + max(0, req.delta_decode))


def place(tree: TopologyTree, requests: Iterable[ScaleRequest], config: SchedulerConfig = SchedulerConfig()
          ) -> Placement:
    """Run one scheduling cycle. Mutates `tree`'s free counts (virtual allocation); returns what to do."""
    actions: list[PlacementAction] = []
    unplaced: list[Unplaced] = []
    ordered = sorted(requests, key=lambda r: (-r.service.priority, _held_share(r), r.service.name))
    taken_names = {g.name for r in ordered for g in r.groups}
    for req in ordered:
        p, d = req.delta_prefill, req.delta_decode
        if (p > 0 and d < 0) or (p < 0 and d > 0):
            unplaced.append(Unplaced(req.service.name, p, d, Why.INVALID_REQUEST,
                                     f"prefill and decode move in the same direction (got {p:+d}P {d:+d}D)"))
        elif p > 0 or d > 0:
            _scale_out(tree, req, config, actions, unplaced, taken_names)
        elif p < 0 or d < 0:
            _scale_in(tree, req, actions, unplaced)
    return Placement(tuple(actions), tuple(unplaced))
