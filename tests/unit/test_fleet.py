"""Many services, one cycle (autoscaler.fleet inside autoscaler.cycle): whole-group preemption of lower
priorities through withdraw then remove, the freed domain going to the higher priority, the lower one coming back
when it shrinks; floors, equal priorities, the budget per GPU type; properties over random demand."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.cycle import ClusterView, CycleConfig, GroupActionKind, GroupState
from autoscaler.fleet import group_gpus
from autoscaler.model import (FleetConfig, Observation, PolicyConfig, PolicyState, Reason, RoleCounts,
                              ServiceObservation, Signal)
from autoscaler.port import step
from common.vocab import DeploymentGroup, NodeInfo, Scope
from placement.scheduler import ServiceShape

# The local demo cluster's shape: two S1s, each one L20 and one H20 (one GPU each).
NODES = (NodeInfo("a-l20", "L20", 1, 1, "s1-a", "s2-0"), NodeInfo("a-h20", "H20", 1, 1, "s1-a", "s2-0"),
         NodeInfo("b-l20", "L20", 1, 1, "s1-b", "s2-0"), NodeInfo("b-h20", "H20", 1, 1, "s1-b", "s2-0"))


def shape(name: str, priority: int) -> ServiceShape:
    return ServiceShape(name, ("L20", "H20"), ("H20", "L20"), affinity=Scope.S1, priority=priority)


def policy(priority: int, **overrides) -> PolicyConfig:
    base = dict(target_decode_tps_per_instance=100.0, prefill_per_decode=1.0, scale_out_cooldown_s=0.0,
                scale_in_cooldown_s=0.0, soft_scale_in_window_s=30.0, max_step_fraction=10.0, max_prefill=4,
                max_decode=4, priority=priority)
    return PolicyConfig(**{**base, **overrides})


def fleet_config(policies: dict[str, PolicyConfig], **fleet) -> CycleConfig:
    return CycleConfig(FleetConfig(services=policies, **fleet),
                       {name: shape(name, cfg.priority) for name, cfg in policies.items()})


class FleetWorld:
    """Several services over one set of nodes; actions apply at once (every replica Ready). A group's GPUs are
    charged to its domain's nodes of each type."""

    def __init__(self, config: CycleConfig, groups=(), nodes=NODES):
        self.config, self.nodes = config, nodes
        self.groups: dict[str, dict[str, GroupState]] = {name: {} for name in config.fleet.services}
        for g in groups:
            self.groups[g.service][g.name] = GroupState(g, RoleCounts(g.num_prefill), RoleCounts(g.num_decode))
        self.tps = {name: 0.0 for name in config.fleet.services}
        self.history: list = []  # (view before, actions) per step

    def observe(self, now_s):
        out = {}
        for name, groups in self.groups.items():
            gs = list(groups.values())
            out[name] = ServiceObservation(
                decode_tps=Signal(self.tps[name], now_s), ttft_s=Signal(0.1, now_s),
                prefill=RoleCounts(sum(g.prefill.ready for g in gs), 0, sum(g.prefill.withdrawn for g in gs)),
                decode=RoleCounts(sum(g.decode.ready for g in gs), 0, sum(g.decode.withdrawn for g in gs)))
        return Observation(out)

    def used(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for name, groups in self.groups.items():
            for gs in groups.values():
                for t, n in group_gpus(gs.group, self.config.shapes[name]).items():
                    used[t] = used.get(t, 0) + n
        return used

    def cluster_view(self, now_s):
        left = {}
        for name, groups in self.groups.items():
            for gs in groups.values():
                for t, n in group_gpus(gs.group, self.config.shapes[name]).items():
                    left[(gs.group.domain, t)] = left.get((gs.group.domain, t), 0) + n
        nodes = []
        for n in self.nodes:
            take = min(left.get((n.s1, n.gpu_type), 0), n.total_gpus)
            left[(n.s1, n.gpu_type)] = left.get((n.s1, n.gpu_type), 0) - take
            nodes.append(replace(n, free_gpus=n.total_gpus - take))
        assert all(v <= 0 for v in left.values()), f"over-subscribed: {left}"
        view = ClusterView(tuple(nodes), {k: tuple(v[g] for g in sorted(v)) for k, v in self.groups.items()})
        self.history.append(view)
        return view

    def apply(self, actions, now_s):
        for a in actions:
            mine = self.groups[a.service]
            if a.kind is GroupActionKind.REMOVE:
                del mine[a.group.name]
            else:
                g = a.group
                mine[g.name] = GroupState(g, RoleCounts(g.num_prefill - a.withdrawn_prefill, 0, a.withdrawn_prefill),
                                          RoleCounts(g.num_decode - a.withdrawn_decode, 0, a.withdrawn_decode))
        return ()

    def held(self, name: str) -> list[tuple[str, int, int, int, int]]:
        return sorted((g.group.domain, g.group.num_prefill, g.group.num_decode, g.prefill.withdrawn,
                       g.decode.withdrawn) for g in self.groups[name].values())


def dg(service: str, domain: str, p: int = 1, d: int = 1) -> DeploymentGroup:
    return DeploymentGroup(f"{service}-{domain}", service, Scope.S1, domain, "L20", "H20", p, d)


def two_services(**batch) -> tuple[FleetWorld, CycleConfig]:
    cfg = fleet_config({"chat": policy(10), "batch": policy(0, **batch)})
    world = FleetWorld(cfg, [dg("chat", "s1-a"), dg("batch", "s1-b")])
    world.tps = {"chat": 80.0, "batch": 80.0}
    return world, cfg


def test_a_higher_priority_takes_a_lower_ones_whole_group_through_withdraw_then_remove_and_gives_it_back():
    world, cfg = two_services(fleet_min_decode=0)
    state, t = PolicyState(), 0.0
    result, state, _, _ = step(world, state, t, cfg)
    assert result.actions == ()  # both fit their one group
    world.tps["chat"] = 180.0  # 2 decode replicas' worth: a second group, and no free GPU
    result, state, _, _ = step(world, state, t := t + 5, cfg)
    (p,) = result.preempted
    assert (p.service, p.group, p.for_service) == ("batch", "batch-s1-b", "chat")
    (withdraw,) = result.actions
    assert withdraw.kind is GroupActionKind.WITHDRAW and withdraw.reason is Reason.PREEMPTED
    assert world.held("batch") == [("s1-b", 1, 1, 1, 1)]  # both roles out of routing at once
    assert result.decision.services["batch"].reason is Reason.PREEMPTED
    assert state.services["chat"].target_decode == 2  # kept asking: placed first once the room is free
    result, state, _, _ = step(world, state, t := t + 5, cfg)
    assert [(a.kind, a.reason) for a in result.actions] == [(GroupActionKind.REMOVE, Reason.PREEMPTED)]
    assert world.held("batch") == [] and not result.preempted  # one preemption in flight: no second one
    result, state, _, _ = step(world, state, t := t + 5, cfg)
    assert world.held("chat") == [("s1-a", 1, 1, 0, 0), ("s1-b", 1, 1, 0, 0)]
    assert result.decision.services["batch"].reason is Reason.RECLAIM  # asks its minimum back, no room
    assert state.preemptions == ()
    world.tps["chat"] = 60.0  # the load falls: chat withdraws, then terminates its second group
    for _ in range(10):
        result, state, _, _ = step(world, state, t := t + 10, cfg)
        if world.held("batch"):
            break
    (chat,), (batch,) = world.held("chat"), world.held("batch")  # batch back where chat's room came free
    assert chat[1:] == batch[1:] == (1, 1, 0, 0) and {chat[0], batch[0]} == {"s1-a", "s1-b"}


def test_a_floor_is_kept_and_equal_priorities_never_preempt():
    world, cfg = two_services()  # batch keeps its minimum (fleet_min_decode None: min_decode 1)
    world.tps["chat"] = 180.0
    state = PolicyState()
    for i in range(4):
        result, state, _, _ = step(world, state, 5.0 * i, cfg)
        assert not result.preempted
    assert world.held("batch") == [("s1-b", 1, 1, 0, 0)]
    cfg = fleet_config({"chat": policy(0), "batch": policy(0, fleet_min_decode=0)})
    world = FleetWorld(cfg, [dg("chat", "s1-a"), dg("batch", "s1-b")])
    world.tps = {"chat": 180.0, "batch": 80.0}
    state = PolicyState()
    for i in range(4):
        result, state, _, _ = step(world, state, 5.0 * i, cfg)
        assert not result.preempted
    assert world.held("batch") == [("s1-b", 1, 1, 0, 0)]


def test_the_budget_per_gpu_type_holds_and_a_higher_priority_gets_it_by_preemption():
    cfg = fleet_config({"chat": policy(10), "batch": policy(0, fleet_min_decode=0)}, gpu_budget_by_type={"H20": 1})
    nodes = NODES + (NodeInfo("c-l20", "L20", 1, 1, "s1-c", "s2-0"), NodeInfo("c-h20", "H20", 1, 1, "s1-c", "s2-0"))
    world = FleetWorld(cfg, [dg("batch", "s1-b")], nodes=nodes)
    world.tps = {"chat": 80.0, "batch": 80.0}
    state, t, seen = PolicyState(), 0.0, set()
    for _ in range(6):
        result, state, _, _ = step(world, state, t := t + 5, cfg)
        seen |= {u.why.value for u in result.unplaced}
        assert world.used().get("H20", 0) <= 1
    assert "budget" in seen  # chat's first group: free GPUs, but batch holds the only H20 the budget allows
    assert world.held("batch") == []
    (chat,) = world.groups["chat"].values()
    assert (chat.group.num_prefill, chat.group.num_decode) == (1, 1)
    assert (chat.group.prefill_gpu_type, chat.group.decode_gpu_type) in (("L20", "H20"), ("L20", "L20"))


@st.composite
def fleets(draw):
    n = draw(st.integers(2, 3))
    policies = {f"s{i}": policy(draw(st.integers(0, 2)), fleet_min_decode=draw(st.sampled_from([None, 0])),
                                prefill_per_decode=draw(st.sampled_from([0.5, 1.0, 2.0])))
                for i in range(n)}
    budget = draw(st.none() | st.integers(4, 10))
    by_type = draw(st.dictionaries(st.sampled_from(["L20", "H20"]), st.integers(2, 6)))
    floor = sum(c.gpus(*c.fleet_floor()) for c in policies.values())
    if budget is not None and budget < floor:
        budget = floor
    demand = draw(st.lists(st.lists(st.sampled_from([0.0, 50.0, 150.0, 300.0]), min_size=n, max_size=n),
                           min_size=4, max_size=14))
    return policies, budget, by_type, demand


@settings(max_examples=60, deadline=None)
@given(fleets())
def test_fleet_invariants_over_random_demand(data):
    policies, budget, by_type, demand = data
    nodes = tuple(NodeInfo(f"{s1}-{t}-{i}", t, 2, 2, s1, "s2-0") for s1 in ("s1-a", "s1-b", "s1-c")
                  for t in ("L20", "H20") for i in range(2))
    cfg = fleet_config(policies, gpu_budget=budget, gpu_budget_by_type=by_type)
    world = FleetWorld(cfg, nodes=nodes)
    state, t = PolicyState(), 0.0
    for tick in demand:
        world.tps = dict(zip(sorted(policies), tick))
        before = {name: {g.group.name: g for g in groups.values()} for name, groups in world.groups.items()}
        result, state, _, view = step(world, state, t := t + 10, cfg)
        used = world.used()
        assert budget is None or sum(used.values()) <= budget
        assert all(used.get(gpu_type, 0) <= cap for gpu_type, cap in by_type.items())
        for groups in world.groups.values():  # no group ever holds one role
            assert all(g.group.num_prefill >= 1 and g.group.num_decode >= 1 for g in groups.values())
        for a in result.actions:
            if a.kind is GroupActionKind.REMOVE and a.reason is Reason.PREEMPTED:
                was = before[a.service][a.group.name]  # withdrawn whole in an earlier cycle
                assert was.prefill.ready == 0 and was.decode.ready == 0
        for p in result.preempted:
            assert policies[p.for_service].priority > policies[p.service].priority
            kept = [g for g in view.groups[p.service]
                    if g.name not in {q.group for q in state.preemptions if q.service == p.service}]
            floor = policies[p.service].fleet_floor()
            assert sum(g.group.num_prefill for g in kept) >= floor[0]
            assert sum(g.group.num_decode for g in kept) >= floor[1]
