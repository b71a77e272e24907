"""Every deployment group at the ratio (architecture invariant 2): random demand sequences through the shared
control cycle, checked per DG after every cycle, total and routable; and the scheduler's band on one delta."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.cycle import ClusterView, CycleConfig, GroupActionKind, GroupState
from autoscaler.model import FleetConfig, Observation, PolicyConfig, PolicyState, RoleCounts, ServiceObservation, Signal
from autoscaler.plan import WorkingGroup, plan_service, terminate_withdrawn
from autoscaler.ratio import ratio_in_force
from autoscaler.port import step
from common.vocab import DeploymentGroup, NodeInfo, Scope
from placement.scheduler import (ActionKind, ScaleRequest, ServiceShape, Why, in_band, nearest_ratio_in_band, place,
                                 prefill_band)
from placement.topology import build_tree


def grid(num_s1: int, nodes_per_s1: int, gpus: int) -> tuple[NodeInfo, ...]:
    return tuple(NodeInfo(f"n{s}-{i}", "H20", gpus, gpus, f"s1-{s}", f"s2-{s // 2}")
                 for s in range(num_s1) for i in range(nodes_per_s1))


class World:
    """Every target replica Ready at once; free GPUs = each S1's nodes less what its groups hold."""

    def __init__(self, nodes, services):
        self.nodes, self.services = nodes, services
        self.groups: dict[str, dict[str, GroupState]] = {s: {} for s in services}
        self.tps = {s: 0.0 for s in services}
        self.prefill_tps: dict[str, float] = {}  # KV-miss prefill tokens/s, for services on the adaptive ratio

    def observe(self, now_s):
        out = {}
        for name, groups in self.groups.items():
            gs = list(groups.values())
            out[name] = ServiceObservation(
                decode_tps=Signal(self.tps[name], now_s),
                prefill_kv_miss_tps=Signal(self.prefill_tps.get(name), now_s),
                prefill=RoleCounts.total(g.prefill for g in gs), decode=RoleCounts.total(g.decode for g in gs))
        return Observation(out)

    def cluster_view(self, now_s):
        used: dict[str, int] = {}
        for groups in self.groups.values():
            for g in groups.values():
                used[g.group.domain] = used.get(g.group.domain, 0) + g.group.num_prefill + g.group.num_decode
        nodes = []
        for n in self.nodes:
            take = min(used.get(n.s1, 0), n.total_gpus)
            used[n.s1] = used.get(n.s1, 0) - take
            nodes.append(replace(n, free_gpus=n.total_gpus - take))
        assert all(v == 0 for v in used.values()), "a domain holds more than its GPUs"
        return ClusterView(tuple(nodes), {s: tuple(g[k] for k in sorted(g)) for s, g in self.groups.items()})

    def apply(self, actions, now_s):
        for a in actions:
            groups = self.groups[a.service]
            if a.kind is GroupActionKind.REMOVE:
                del groups[a.group.name]
                continue
            g = a.group
            groups[g.name] = GroupState(g, RoleCounts(g.num_prefill - a.withdrawn_prefill, 0, a.withdrawn_prefill),
                                        RoleCounts(g.num_decode - a.withdrawn_decode, 0, a.withdrawn_decode))
        return ()


@settings(max_examples=120, deadline=None)
@given(ratios=st.lists(st.floats(0.3, 9.0), min_size=1, max_size=2),
       soft_s=st.sampled_from([0.0, 60.0]),
       demands=st.lists(st.lists(st.floats(0.0, 30.0), min_size=2, max_size=2), min_size=3, max_size=25),
       small_domains=st.booleans())
def test_every_group_stays_inside_the_ratio_band_through_random_demand(ratios, soft_s, demands, small_domains):
    names = [f"svc{i}" for i in range(len(ratios))]
    nodes = grid(6, 2, 4) if small_domains else grid(4, 4, 8)  # small: groups must spread over domains
    policies = {n: PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=r, scale_out_cooldown_s=0.0,
                                scale_in_cooldown_s=0.0, soft_scale_in_window_s=soft_s, max_step_fraction=10.0,
                                max_prefill=10_000, max_decode=10_000)
                for n, r in zip(names, ratios)}
    config = CycleConfig(FleetConfig(services=policies),
                         {n: ServiceShape(n, ("H20",), ("H20",), affinity=Scope.S1) for n in names})
    world, state = World(nodes, names), PolicyState()
    for i, row in enumerate(demands):
        for name, demand in zip(names, row):
            world.tps[name] = demand * 100.0
        result, state, _, _ = step(world, state, 30.0 * i, config)
        for name in names:
            dec = result.decision.services[name]
            ratio = ratio_in_force(policies[name], 30.0 * i, dec.target_prefill, dec.target_decode)
            for gs in world.groups[name].values():
                p, d = gs.group.num_prefill, gs.group.num_decode
                assert p >= 1 and d >= 1, f"{gs.name}: a group lost a role ({p}P, {d}D)"
                assert in_band(p, d, ratio), f"cycle {i}: {gs.name} ({p}P, {d}D) outside {prefill_band(d, ratio)} " \
                                             f"at ratio {ratio:.3f} (targets {dec.target_prefill}P/{dec.target_decode}D)"
                rp, rd = gs.prefill.ready, gs.decode.ready
                if rp and rd:
                    assert in_band(rp, rd, ratio), \
                        f"cycle {i}: {gs.name} routable ({rp}P, {rd}D) outside {prefill_band(rd, ratio)}"


@settings(max_examples=300, deadline=None, derandomize=True)  # 6,000 random examples passed before it landed
@given(ratio=st.floats(0.3, 6.0), two=st.booleans(), soft_s=st.sampled_from([0.0, 60.0]),
       load=st.lists(st.tuples(st.floats(0.0, 30.0), st.floats(0.2, 8.0)), min_size=3, max_size=25),
       small_domains=st.booleans())
def test_an_adaptive_ratio_keeps_every_group_inside_the_band_of_the_ratio_in_force(ratio, two, soft_s, load,
                                                                                   small_domains):
    """The ratio moves with the workload (prefill tokens/s per decode tokens/s from 0.2 to 8, bounds x/÷4) while
    demand moves and domains fill (two services sharing them): every group holds the ratio in force after every
    cycle. Found without it: a rising ratio beside a group whose domain was full (no prefill to add) or a scale-out
    whose decode went to a new group while a prefill-heavy one stayed over the falling ratio's band; a hard
    scale-in that raised the ratio while groups could only shrink; a withdrawal towards a higher ratio that the
    groups could not follow (put in force at termination all the same)."""
    names = ["svc0", "svc1"][:1 + two]
    nodes = grid(6, 2, 4) if small_domains else grid(4, 4, 8)
    policy = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=ratio, scale_out_cooldown_s=0.0,
                          scale_in_cooldown_s=0.0, soft_scale_in_window_s=soft_s, max_step_fraction=10.0,
                          max_prefill=10_000, max_decode=10_000, target_prefill_tps_per_instance=100.0,
                          ratio_range=4.0, ratio_window_s=60.0, ratio_hysteresis=0.1)
    # the second service outranks the first: whole-group preemptions and a requester's target kept above what
    # runs while they go on
    config = CycleConfig(FleetConfig(services={n: replace(policy, priority=k) for k, n in enumerate(names)}),
                         {n: ServiceShape(n, ("H20",), ("H20",), affinity=Scope.S1) for n in names})
    world, state = World(nodes, names), PolicyState()
    for i, (demand, prefill_per_decode) in enumerate(load):
        for k, name in enumerate(names):  # the second service's load and mix move against the first's
            world.tps[name] = (demand if k == 0 else 30.0 - demand) * 100.0
            world.prefill_tps[name] = world.tps[name] * (prefill_per_decode if k == 0 else 8.2 - prefill_per_decode)
        result, state, _, _ = step(world, state, 30.0 * i, config)
        for name in names:
            dec = result.decision.services[name]
            in_force = ratio_in_force(policy, 30.0 * i, dec.target_prefill, dec.target_decode, state.services[name])
            counts = [(gs.group.num_prefill, gs.group.num_decode) for gs in world.groups[name].values()]
            assert all(p >= 1 and d >= 1 for p, d in counts), f"cycle {i}: {name}: a group lost a role: {counts}"
            # a group withdrawn whole (preempted, or a scale-in's before termination) serves nothing: it goes
            counts = [(gs.group.num_prefill, gs.group.num_decode) for gs in world.groups[name].values()
                      if gs.prefill.ready or gs.decode.ready]
            assert all(in_band(p, d, in_force) for p, d in counts), \
                f"cycle {i}: {name}'s groups {counts} not all inside the band of {in_force:.3f} ({dec.action.value})"


def test_a_rising_ratio_beside_a_full_domain_is_placed_at_the_ratio_the_group_can_reach():
    """+12P/+2D at ratio 4 beside (24P, 8D), which fills its 32-GPU domain at ratio 3: that group cannot take
    the 4 prefill ratio 4's band needs (28), so new groups open at a ratio it holds (<= 24/7), not at 4 (which
    left no one ratio holding both groups)."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    group = DeploymentGroup("svc-s1-0", "svc", Scope.S1, "s1-0", "H20", "H20", 24, 8)
    nodes = tuple(replace(n, free_gpus=0) if n.s1 == "s1-0" else n for n in grid(3, 4, 8))
    plan = place(build_tree(nodes), [ScaleRequest(shape, 12, 2, (group,), prefill_per_decode=4.0)])
    counts = [(24, 8)] + [(a.num_prefill, a.num_decode) for a in plan.actions]
    assert all(a.kind is ActionKind.CREATE for a in plan.actions) and len(counts) > 1
    held = nearest_ratio_in_band(counts, 4.0)
    assert held is not None and held <= 24 / 7, counts


def test_a_scale_out_under_a_falling_ratio_brings_a_prefill_heavy_group_into_its_band():
    """+1P/+1D at ratio 0.7 beside (2P, 1D), placed when the ratio was higher: the group takes the decode that
    brings it inside 0.7's band (2 <= ceil(2 x 0.7)) first; the prefill left opens a group of its own (PAIRED).
    Before, the decode and prefill opened (1P, 1D) elsewhere and left (2P, 1D) over its band's top (1)."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    group = DeploymentGroup("svc-s1-0", "svc", Scope.S1, "s1-0", "H20", "H20", 2, 1)
    plan = place(build_tree(grid(3, 1, 8)), [ScaleRequest(shape, 1, 1, (group,), prefill_per_decode=0.7)])
    after = {group.name: [2, 1]}
    for a in plan.actions:
        after.setdefault(a.group, [0, 0])
        after[a.group][0] += a.num_prefill
        after[a.group][1] += a.num_decode
    assert not plan.unplaced and after[group.name] == [2, 2], after
    assert all(in_band(p, d, 0.7) for p, d in after.values()), after


def test_a_prefill_only_delta_beside_a_one_decode_group_opens_a_group_with_decode():
    """+3P/+0D at ratio 2 beside a (2P, 1D) group: the group's band tops out at 2 prefill, so the prefill
    cannot go there (it would idle: KV never leaves a group); a new group takes it with the decode its band
    needs (2: ceil((2-1) x 2) <= 3 <= ceil(2 x 2)), over the target (PAIRED)."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    group = DeploymentGroup("svc-s1-0", "svc", Scope.S1, "s1-0", "H20", "H20", 2, 1)
    plan = place(build_tree(grid(2, 1, 8)), [ScaleRequest(shape, 3, 0, (group,), prefill_per_decode=2.0)])
    assert not plan.unplaced
    assert [(a.kind, a.domain, a.num_prefill, a.num_decode, a.why) for a in plan.actions] == [
        (ActionKind.CREATE, "s1-1", 3, 2, Why.PAIRED)]
    # without a band (the old rule) the whole delta went into the group: 5 prefill beside 1 decode
    plan = place(build_tree(grid(2, 1, 8)), [ScaleRequest(shape, 3, 0, (group,))])
    assert [(a.kind, a.num_prefill, a.num_decode) for a in plan.actions] == [(ActionKind.GROW, 3, 0)]


def test_a_scale_out_delta_is_split_across_groups_inside_their_bands():
    """+7P/+1D at ratio 3.5 over groups (7P, 2D) and (4P, 2D): the new decode and its prefill go where the band
    allows, and the rest of the prefill fills the group below its band first."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    groups = (DeploymentGroup("a", "svc", Scope.S1, "s1-0", "H20", "H20", 7, 2),
              DeploymentGroup("b", "svc", Scope.S1, "s1-1", "H20", "H20", 4, 2))
    plan = place(build_tree(grid(2, 2, 8)), [ScaleRequest(shape, 7, 1, groups, prefill_per_decode=3.6)])
    assert not plan.unplaced
    after = {g.name: [g.num_prefill, g.num_decode] for g in groups}
    for a in plan.actions:
        after[a.group][0] += a.num_prefill
        after[a.group][1] += a.num_decode
    assert sum(p for p, _ in after.values()) == 18 and sum(d for _, d in after.values()) == 5
    assert all(in_band(p, d, 3.6) for p, d in after.values()), after


def test_scale_in_takes_from_the_groups_over_their_band():
    """-4P/-0D at ratio 2 over (6P, 3D) and (10P, 3D): the second is over its band's top (6), so it gives the
    prefill; the first keeps all of its own."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    groups = (DeploymentGroup("a", "svc", Scope.S1, "s1-0", "H20", "H20", 6, 3),
              DeploymentGroup("b", "svc", Scope.S1, "s1-1", "H20", "H20", 10, 3))
    plan = place(build_tree(grid(2, 2, 8)), [ScaleRequest(shape, -4, 0, groups, prefill_per_decode=2.0)])
    assert not plan.unplaced
    assert [(a.group, a.kind, a.num_prefill, a.num_decode) for a in plan.actions] == [("b", ActionKind.SHRINK, 4, 0)]


def test_a_termination_never_leaves_a_group_with_one_role():
    """Two groups withdrawn whole, the termination asked for less prefill than they hold withdrawn (a target
    kept above what ran while a preemption went on): once all of the second's decode goes, its prefill goes
    with it, rather than staying with no decode (nothing could be served there: KV never leaves a group).
    Before, it was left (121P, 0D) and restored; a group not withdrawn whole keeps its last decode."""
    def withdrawn(name, p, d):
        return WorkingGroup(GroupState(DeploymentGroup(name, "svc", Scope.S1, name, "H20", "H20", p, d),
                                       RoleCounts(withdrawn=p), RoleCounts(withdrawn=d)), p, d, p, d)

    groups = [withdrawn("a", 378, 69), withdrawn("b", 121, 22)]
    assert terminate_withdrawn(groups, 400, 91) == (0, 0)
    assert [(g.num_prefill, g.num_decode) for g in groups] == [(0, 0), (0, 0)]
    part = WorkingGroup(GroupState(DeploymentGroup("c", "svc", Scope.S1, "c", "H20", "H20", 10, 3),
                                   RoleCounts(ready=2, withdrawn=8), RoleCounts(withdrawn=3)), 10, 3, 8, 3)
    terminate_withdrawn([part], 8, 3)
    assert (part.num_prefill, part.num_decode) == (2, 1)


def test_a_withdrawal_never_asks_past_what_the_groups_hold():
    """Targets (3766P, 471D) kept above what the groups hold (2582P, 471D), and a soft scale-in to (1887P, 236D):
    the groups are asked to withdraw 695 prefill (down to 1887), not the 1879 the targets' difference says."""
    shape = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)
    groups = [WorkingGroup.of(GroupState(DeploymentGroup(f"g{i}", "svc", Scope.S1, f"s1-{i}", "H20", "H20", p, d),
                                         RoleCounts(ready=p), RoleCounts(ready=d)))
              for i, (p, d) in enumerate([(1291, 236), (1291, 235)])]
    out, terminate, withdrawing, _ = plan_service(shape, 8.0, (3766, 471), (1879, 235), groups,
                                                  lambda *a: True)
    assert not terminate
    assert [(-r.delta_prefill, -r.delta_decode) for r in withdrawing] == [(695, 235)]
