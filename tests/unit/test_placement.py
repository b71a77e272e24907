"""Placement core on synthetic trees: tiers, lowest-sufficient tier, virtual allocation, grow vs new, batches,
scale-in order, fallback types, MoE, reasons; plus properties over random trees."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.vocab import DeploymentGroup, NodeInfo, Scope
from placement.scheduler import (
    ActionKind,
    MoeShape,
    ScaleRequest,
    SchedulerConfig,
    ServiceShape,
    Why,
    place,
)
from placement.topology import Budget, Tier, build_tree


def nodes(s2, s1, gpu, count, gpus=8, free=None):
    return [NodeInfo(f"{s1}-{gpu}-{i}", gpu, gpus, gpus if free is None else free, s1, s2) for i in range(count)]


def fleet():
    return build_tree(
        nodes("s2-homo", "h1", "L20", 2) + nodes("s2-homo", "h2", "L20", 2)
        + nodes("s2-mixed", "m1", "H20", 2) + nodes("s2-mixed", "m2", "L20", 2)
        + nodes("s2-hot", "x1", "H20", 2) + nodes("s2-hot", "x1", "L20", 2)
    )


HETERO_S1 = ServiceShape("hetero-s1", ("L20",), ("H20",), affinity=Scope.S1)
HETERO_S2 = ServiceShape("hetero-s2", ("L20",), ("H20",), affinity=Scope.S2)
HOMO = ServiceShape("homo", ("L20",), ("L20",), affinity=Scope.S1)


def test_subgroup_tiers():
    tiers = fleet().tiers()
    assert tiers[("s2", "s2-homo")] is Tier.LOW and tiers[("s1", "h1")] is Tier.LOW
    assert tiers[("s2", "s2-mixed")] is Tier.MEDIUM and tiers[("s1", "m1")] is Tier.MEDIUM
    assert tiers[("s1", "x1")] is Tier.HIGH and tiers[("s2", "s2-hot")] is Tier.HIGH
    assert tiers[("cluster", "*")] is Tier.LOW


def test_a_tree_reads_the_free_gpus_of_the_nodes_that_moved_and_never_those_a_scheduler_allocated():
    """build_tree reuses the last tree's structure and free counts where the nodes are the very same objects:
    a node replaced with new free GPUs is read afresh, a node relabelled rebuilds the structure, and what a
    scheduler allocated on one tree never shows in the next."""
    from dataclasses import replace

    fleet_nodes = nodes("s2-a", "a1", "L20", 3) + nodes("s2-b", "b1", "H20", 2)
    first = build_tree(fleet_nodes)
    first.free["a1-L20-0"] = 0  # a scheduler's virtual allocation on the first tree
    moved = list(fleet_nodes)
    moved[1] = replace(moved[1], free_gpus=5)
    second = build_tree(moved)
    assert second.free == {**{n.node_id: 8 for n in fleet_nodes}, "a1-L20-1": 5}
    assert second.free_gpus(second.domain(Scope.S1, "a1")) == 8 + 5 + 8
    assert first.free["a1-L20-0"] == 0 and first.free_gpus(first.domain(Scope.S1, "a1")) == 0 + 8 + 8
    relabelled = list(moved)
    relabelled[4] = replace(relabelled[4], s1="a1", s2="s2-a")
    third = build_tree(relabelled)
    assert third.domain(Scope.S1, "a1").gpu_types() == {"L20", "H20"}
    assert third.domain(Scope.S1, "a1").tier is Tier.HIGH and third.free == second.free
    assert build_tree(fleet_nodes).free == {n.node_id: 8 for n in fleet_nodes}


def test_each_service_takes_the_lowest_tier_that_satisfies_it():
    plan = place(fleet(), [ScaleRequest(HETERO_S1, 1, 3), ScaleRequest(HETERO_S2, 1, 3), ScaleRequest(HOMO, 1, 3)])
    by = {a.service: a for a in plan.actions}
    assert (by["hetero-s1"].domain, by["hetero-s1"].tier) == ("x1", Tier.HIGH)  # only S1 with both types
    assert (by["hetero-s2"].domain, by["hetero-s2"].tier) == ("s2-mixed", Tier.MEDIUM)  # not the HIGH S2
    assert by["homo"].tier is Tier.LOW
    assert all(a.kind is ActionKind.CREATE and a.why is Why.LOWEST_TIER for a in plan.actions)
    assert not plan.unplaced


def test_virtual_allocation_within_a_cycle_serves_priority_first():
    tree = fleet()
    vip = ServiceShape("vip", ("L20",), ("H20",), affinity=Scope.S1, priority=5)
    other = ServiceShape("other", ("L20",), ("H20",), affinity=Scope.S1, priority=1)
    plan = place(tree, [ScaleRequest(other, 8, 16), ScaleRequest(vip, 8, 16)])  # x1 holds 16 L20 + 16 H20
    assert [a.service for a in plan.actions] == ["vip"]
    assert plan.unplaced[0].service == "other" and plan.unplaced[0].why is Why.NO_CAPACITY
    assert tree.free_gpus(tree.domain("s1", "x1"), "H20") == 0


def test_grow_an_existing_group_before_opening_a_new_one():
    tree = fleet()
    group = DeploymentGroup("homo-h1", "homo", "s1", "h1", "L20", "L20", 1, 2)
    plan = place(tree, [ScaleRequest(HOMO, 1, 2, (group,))])
    assert [(a.kind, a.group, a.domain) for a in plan.actions] == [(ActionKind.GROW, "homo-h1", "h1")]


def test_most_filled_domain_first_limits_fragmentation():
    tree = build_tree(nodes("s2", "a", "L20", 2, free=8) + nodes("s2", "b", "L20", 2, free=3))
    plan = place(tree, [ScaleRequest(HOMO, 1, 2)])
    assert plan.actions[0].domain == "b"


def test_an_existing_group_grows_before_a_fuller_domain_takes_a_new_one():
    # b would end fuller (the anti-fragmentation tie-break), but a second group of the same service there would
    # split its requests over two smaller pools
    tree = build_tree(nodes("s2", "a", "L20", 2, free=8) + nodes("s2", "b", "L20", 2, free=3))
    group = DeploymentGroup("homo-a", "homo", "s1", "a", "L20", "L20", 1, 2)
    plan = place(tree, [ScaleRequest(HOMO, 1, 2, (group,))])
    assert [(a.kind, a.group, a.domain) for a in plan.actions] == [(ActionKind.GROW, "homo-a", "a")]


def test_a_batch_is_whole_or_nothing():
    tree = fleet()
    before = dict(tree.free)
    plan = place(tree, [ScaleRequest(HETERO_S1, 20, 40)], SchedulerConfig(max_batch_splits=1))
    assert plan.actions == () and plan.unplaced[0].why is Why.NO_CAPACITY
    assert tree.free == before  # nothing half-reserved


def test_a_large_batch_splits_into_whole_sub_batches():
    tree = build_tree(nodes("s2", "a", "L20", 1) + nodes("s2", "a", "H20", 1)
                      + nodes("s2", "b", "L20", 1) + nodes("s2", "b", "H20", 1))
    plan = place(tree, [ScaleRequest(HETERO_S1, 4, 12)])
    assert len(plan.actions) == 2 and all(a.why is Why.SPLIT for a in plan.actions)
    assert sum(a.num_prefill for a in plan.actions) == 4 and sum(a.num_decode for a in plan.actions) == 12
    assert all(a.num_prefill >= 1 and a.num_decode >= 1 for a in plan.actions)
    assert {a.domain for a in plan.actions} == {"a", "b"}


def test_scale_in_takes_from_the_most_precious_tier_first():
    tree = fleet()
    groups = (DeploymentGroup("g-low", "homo", "s1", "h1", "L20", "L20", 2, 6),
              DeploymentGroup("g-high", "homo", "s1", "x1", "L20", "L20", 2, 6))
    before = dict(tree.free)
    plan = place(tree, [ScaleRequest(HOMO, -1, -3, groups)])
    assert [(a.kind, a.group, a.num_prefill, a.num_decode) for a in plan.actions] == [
        (ActionKind.SHRINK, "g-high", 1, 3)]
    assert tree.free == before  # freed GPUs come back only when the next cycle rebuilds the tree
    plan = place(fleet(), [ScaleRequest(HOMO, -3, -8, groups)])
    assert [(a.kind, a.group) for a in plan.actions] == [(ActionKind.REMOVE, "g-high"), (ActionKind.SHRINK, "g-low")]


def test_fallback_gpu_type_when_the_preferred_one_is_absent():
    svc = ServiceShape("fb", ("H800", "L20"), ("H20",), affinity=Scope.S1)
    action = place(fleet(), [ScaleRequest(svc, 1, 2)]).actions[0]
    assert (action.prefill_gpu_type, action.domain) == ("L20", "x1")
    assert "fallback rank 1" in action.detail


def test_the_gpu_budget_caps_each_type_and_the_total_and_falls_back_to_a_type_with_budget():
    tree = fleet()
    tree.budget = Budget({"H20": 2}, total=10)
    both = ServiceShape("both", ("L20",), ("H20", "L20"), affinity=Scope.S2)
    plan = place(tree, [ScaleRequest(both, 2, 4)])
    taken = Counter()
    for a in plan.actions:
        for role, node_id, gpus in a.node_gpus:
            taken[tree.nodes[node_id].gpu_type] += gpus
    assert taken["H20"] <= 2 and sum(taken.values()) <= 10 and not plan.unplaced
    assert [(a.prefill_gpu_type, a.decode_gpu_type) for a in plan.actions] == [("L20", "L20")]  # H20 short: fallback
    assert tree.budget.total == 4 and tree.budget.by_type == {"H20": 2}
    plan = place(tree, [ScaleRequest(HETERO_S1, 1, 3)])  # H20 decode: 2 GPUs of budget left for 3 instances
    assert plan.unplaced and plan.unplaced[0].why is Why.BUDGET and "H20" in plan.unplaced[0].detail
    assert sum(a.num_decode for a in plan.actions) <= 2


def test_unplaceable_reasons():
    nowhere = ServiceShape("nowhere", ("B200",), ("H20",), affinity=Scope.S1)
    plan = place(fleet(), [ScaleRequest(nowhere, 1, 1), ScaleRequest(HOMO, 1, -1)])
    why = {u.service: u.why for u in plan.unplaced}
    assert why == {"nowhere": Why.NO_DOMAIN_WITH_TYPES, "homo": Why.INVALID_REQUEST}
    assert "B200" in plan.unplaced[[u.service for u in plan.unplaced].index("nowhere")].detail
    with pytest.raises(ValueError, match="affinity"):
        ServiceShape("x", ("L20",), ("H20",), affinity="rack")


def test_decode_only_growth_grows_a_group_or_opens_a_paired_one():
    """A group needs both roles: decode-only growth that no group of the service can take opens a new group
    with one prefill beside it (the cycle gives the extra prefill back next time), never a decode-only one."""
    plan = place(fleet(), [ScaleRequest(HOMO, 0, 1)])
    assert not plan.unplaced
    assert [(a.kind, a.num_prefill, a.num_decode, a.why) for a in plan.actions] == [
        (ActionKind.CREATE, 1, 1, Why.PAIRED)]
    group = DeploymentGroup("homo-h1", "homo", "s1", "h1", "L20", "L20", 1, 2)
    plan = place(fleet(), [ScaleRequest(HOMO, 0, 1, (group,))])
    assert [(a.kind, a.num_prefill, a.num_decode) for a in plan.actions] == [(ActionKind.GROW, 0, 1)]


def test_moe_attention_and_ffn_share_an_s1_and_the_pair_an_s2():
    tree = build_tree(nodes("s2-a", "a1", "H20", 1, gpus=4) + nodes("s2-a", "a2", "L20", 1, gpus=4)
                      + nodes("s2-a", "a3", "H20", 1) + nodes("s2-a", "a3", "L20", 1))
    moe = MoeShape(attn_per_prefill=1, ffn_per_prefill=2, attn_gpu_types=("H20",), ffn_gpu_types=("L20",))
    svc = ServiceShape("moe", ("H20",), ("H20",), affinity=Scope.S2, moe=moe)
    action = place(tree, [ScaleRequest(svc, 2, 2)]).actions[0]
    attn_ffn = [(role, node) for role, node, _ in action.node_gpus if role in ("attn", "ffn")]
    assert Counter(role for role, _ in attn_ffn) == {"attn": 2, "ffn": 4}
    assert {tree.nodes[n].s1 for _, n in attn_ffn} == {"a3"}  # the only S1 with both H20 and L20
    assert action.domain == "s2-a"
    with pytest.raises(ValueError, match="needs affinity 's2'"):
        ServiceShape("moe", ("H20",), ("H20",), affinity=Scope.S1, moe=moe)


# ---- properties ----------------------------------------------------------------------------------------------

@st.composite
def trees_and_requests(draw):
    node_list = []
    for s2 in range(draw(st.integers(1, 3))):
        for s1 in range(draw(st.integers(1, 3))):
            for i in range(draw(st.integers(1, 3))):
                gpu = draw(st.sampled_from(["L20", "H20", "A100"]))
                total = draw(st.integers(1, 8))
                node_list.append(NodeInfo(f"n{s2}-{s1}-{i}", gpu, total, draw(st.integers(0, total)),
                                          f"s1-{s2}-{s1}", f"s2-{s2}"))
    reqs = []
    for k in range(draw(st.integers(1, 6))):
        svc = ServiceShape(f"svc{k}", tuple(draw(st.permutations(["L20", "H20", "A100"]))[:2]),
                           tuple(draw(st.permutations(["L20", "H20", "A100"]))[:2]),
                           affinity=draw(st.sampled_from([Scope.S1, Scope.S2, Scope.CLUSTER])),
                           priority=draw(st.integers(0, 3)), gpus_per_prefill=draw(st.integers(1, 2)))
        reqs.append(ScaleRequest(svc, draw(st.integers(1, 6)), draw(st.integers(1, 12))))
    return node_list, reqs


@settings(max_examples=150, deadline=None)
@given(trees_and_requests())
def test_no_gpu_over_committed_and_every_group_in_one_domain(data):
    node_list, reqs = data
    tree = build_tree(node_list)
    initial = {n.node_id: n.free_gpus for n in node_list}
    plan = place(tree, reqs)
    used = Counter()
    for action in plan.actions:
        assert action.num_prefill >= 0 and action.num_decode >= 0
        if action.kind is ActionKind.CREATE:
            assert action.num_prefill >= 1 and action.num_decode >= 1
        for role, node_id, gpus in action.node_gpus:
            used[node_id] += gpus
            node = tree.nodes[node_id]
            if action.scope != Scope.CLUSTER:
                assert getattr(node, action.scope) == action.domain  # the whole group sits in its domain
            assert node.gpu_type == (action.prefill_gpu_type if role == "prefill" else action.decode_gpu_type)
    for node_id, gpus in used.items():
        assert gpus <= initial[node_id]
        assert tree.free[node_id] == initial[node_id] - gpus
    placed = Counter()
    for action in plan.actions:
        placed[action.service] += action.num_prefill + action.num_decode
    for req in reqs:  # placed + unplaced == requested, per service (+1 of the other role per paired group)
        left = sum(u.num_prefill + u.num_decode for u in plan.unplaced if u.service == req.service.name)
        paired = sum(a.why is Why.PAIRED for a in plan.actions if a.service == req.service.name)
        assert placed[req.service.name] + left == req.delta_prefill + req.delta_decode + paired


@settings(max_examples=100, deadline=None)
@given(trees_and_requests(), st.dictionaries(st.sampled_from(["L20", "H20", "A100"]), st.integers(0, 12)),
       st.none() | st.integers(0, 30))
def test_placement_never_spends_more_than_the_budget(data, by_type, total):
    node_list, reqs = data
    tree = build_tree(node_list)
    tree.budget = Budget(dict(by_type), total)
    plan = place(tree, reqs)
    taken = Counter()
    for action in plan.actions:
        for _, node_id, gpus in action.node_gpus:
            taken[tree.nodes[node_id].gpu_type] += gpus
    assert all(taken[t] <= cap for t, cap in by_type.items())
    assert total is None or sum(taken.values()) <= total
