"""Node supply (autoscaler.supply): the whole target shape the controller asks Ray's cluster autoscaler for, and
where a scale-out that fits nowhere would go on the nodes the configured node types can add."""

from __future__ import annotations

import pytest

from autoscaler.cycle import ClusterView, CycleConfig, GroupState, cycle
from autoscaler.model import FleetConfig, Observation, PolicyConfig, PolicyState, RoleCounts, ServiceObservation, Signal
from autoscaler.supply import SupplyNodeType, plan_supply, supplied_nodes
from common.vocab import LABEL_GPU_TYPE, LABEL_S1, DeploymentGroup, NodeInfo, Scope
from placement.scheduler import ServiceShape

SHAPE = ServiceShape("svc", ("L20",), ("H20",), affinity=Scope.S1)
# s1-a holds one L20 and one H20 node, both taken by dg-a; s1-b has no node yet
NODES = (NodeInfo("a-l20", "L20", 1, 0, "s1-a", "s2-0"), NodeInfo("a-h20", "H20", 1, 0, "s1-a", "s2-0"))
DG_A = DeploymentGroup("dg-a", "svc", Scope.S1, "s1-a", "L20", "H20", 1, 1)
SUPPLY = (SupplyNodeType("L20", 1, "s1-b", "s2-0", 2), SupplyNodeType("H20", 1, "s1-b", "s2-0", 2))


def run_cycle(decode_tps: float, nodes=NODES, groups=(DG_A,)):
    config = CycleConfig(FleetConfig(services={"svc": PolicyConfig(
        target_decode_tps_per_instance=100.0, prefill_per_decode=1.0, scale_out_cooldown_s=0.0,
        max_step_fraction=10.0)}), {"svc": SHAPE})
    view = ClusterView(nodes, {"svc": tuple(GroupState(g, RoleCounts(g.num_prefill), RoleCounts(g.num_decode))
                                            for g in groups)})
    obs = Observation({"svc": ServiceObservation(
        decode_tps=Signal(decode_tps, 100.0), prefill=RoleCounts(sum(g.num_prefill for g in groups)),
        decode=RoleCounts(sum(g.num_decode for g in groups)))})
    result, _ = cycle(PolicyState(), obs, view, 100.0, config)
    return view, result, config


def test_a_scale_out_that_fits_nowhere_asks_for_a_whole_group_in_one_domain():
    view, result, config = run_cycle(190.0)  # D = 2, P = 2: one more of each, s1-a is full
    assert result.unplaced and not result.actions
    plan = plan_supply("svc", view, result, SHAPE, SUPPLY, config.scheduler)
    assert [(a.kind.value, a.domain, a.num_prefill, a.num_decode) for a in plan.added] == [("create", "s1-b", 1, 1)]
    # the whole target shape: dg-a's two instances where they are, and the new group's two, both in s1-b
    assert list(plan.bundles) == [{"GPU_L20": 1.0}, {"GPU_H20": 1.0}, {"GPU_L20": 1.0}, {"GPU_H20": 1.0}]
    assert [(s[LABEL_GPU_TYPE], s[LABEL_S1]) for s in plan.selectors] == [
        ("L20", "s1-a"), ("H20", "s1-a"), ("L20", "s1-b"), ("H20", "s1-b")]
    assert plan.unmet == ()


def test_no_shortfall_asks_for_the_current_shape_only():
    view, result, config = run_cycle(80.0)  # D = 1: holds
    plan = plan_supply("svc", view, result, SHAPE, SUPPLY, config.scheduler)
    assert plan.added == () and len(plan.bundles) == 2


def test_a_domain_the_node_types_cannot_complete_is_not_asked_for():
    only_l20 = (SupplyNodeType("L20", 1, "s1-b", "s2-0", 4),)  # no H20 node can join s1-b: no decode there
    view, result, config = run_cycle(190.0)
    plan = plan_supply("svc", view, result, SHAPE, only_l20, config.scheduler)
    assert plan.added == () and plan.unmet and len(plan.bundles) == 2


def test_max_nodes_counts_the_nodes_already_there():
    joined = NODES + (NodeInfo("b-l20", "L20", 1, 0, "s1-b", "s2-0"),)
    left = supplied_nodes(joined, SUPPLY)
    assert sorted((n.gpu_type, n.s1) for n in left) == [("H20", "s1-b"), ("H20", "s1-b"), ("L20", "s1-b")]
    with pytest.raises(ValueError, match="max_nodes"):
        SupplyNodeType("L20", 1, "s1-b", "s2-0", -1)


def test_the_next_cycle_places_the_group_on_the_joined_nodes():
    joined = NODES + (NodeInfo("b-l20", "L20", 1, 1, "s1-b", "s2-0"), NodeInfo("b-h20", "H20", 1, 1, "s1-b", "s2-0"))
    view, result, config = run_cycle(190.0, nodes=joined)
    assert [(a.kind.value, a.group.domain) for a in result.actions] == [("create", "s1-b")] and not result.unplaced
    plan = plan_supply("svc", view, result, SHAPE, SUPPLY, config.scheduler)
    assert plan.added == () and len(plan.bundles) == 4  # the request now equals what the groups hold


class DictKV:
    """Ray's internal KV calls `request_supply` makes, over a dict."""

    def __init__(self):
        self.d: dict[bytes, bytes] = {}

    def _internal_kv_put(self, key, value, overwrite=True):
        self.d[key] = value

    def _internal_kv_del(self, key):
        self.d.pop(key, None)

    def _internal_kv_list(self, prefix):
        return [k for k in self.d if k.startswith(prefix)]

    def _internal_kv_get(self, key):
        return self.d.get(key)


def test_two_services_asking_at_once_leave_the_union_as_the_last_request():
    """The supply-request race (issue 21, defect 11): service B read the parts before A wrote its own, and B's
    request lands after A's; without a lock, A's part was lost until A's next change. A reads again after its
    request and asks again while the parts changed, so the last request holds both."""
    from placement.ray_adapter import request_supply

    kv, requests = DictKV(), []
    a_part, b_part = [{"GPU": 1}], [{"GPU": 2}]

    def request(bundles, selectors):
        requests.append(bundles)
        if len(requests) == 1:  # B, concurrently: wrote its part after reading none of A's, and asks now
            kv._internal_kv_put(b"heteroscale/supply/b", b'[[{"GPU": 2}], [{}]]')
            requests.append(list(b_part))

    assert request_supply("a", a_part, [{}], kv=kv, request=request) == 2
    assert requests[1] == b_part  # B's stale request came after A's first
    assert sorted(map(str, requests[-1])) == sorted(map(str, a_part + b_part))  # the last one holds both


def test_a_starting_controller_removes_the_probe_groups_a_dead_one_left_and_only_its_own():
    """Probe placement-group leaks (issue 21, defect 9): a controller that died between creating a probe and
    removing it left GPUs reserved; the next one removes its service's leftovers (and no other service's)."""
    from placement.ray_adapter import PROBE_PREFIX, sweep_probes

    table = {"01": {"name": f"{PROBE_PREFIX}svc--dg-b", "state": "CREATED"},
             "02": {"name": f"{PROBE_PREFIX}svc--dg-c", "state": "PENDING"},
             "03": {"name": f"{PROBE_PREFIX}svc--dg-d", "state": "REMOVED"},
             "04": {"name": f"{PROBE_PREFIX}svc-2--dg-a", "state": "CREATED"},
             "05": {"name": "somebody-elses", "state": "CREATED"}}
    removed = []
    assert sweep_probes("svc", table=lambda: table, remove=removed.append) == 2
    assert removed == ["01", "02"]
