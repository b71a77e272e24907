"""Placement on a live local labelled cluster: tree from Ray's node table, all-or-nothing probe placement groups,
and the window between a probe and the replicas' start."""

import time

import pytest

from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc
from common.config import parse_cluster_spec
from placement.ray_adapter import live_nodes, probe, probe_bundles, request_target_shape
from placement.scheduler import ActionKind, PlacementAction, ScaleRequest, ServiceShape, place
from common.vocab import Scope
from placement.topology import Tier, build_tree

TEMP_DIR = "/tmp/hsray-pl"
SPEC = parse_cluster_spec({
    "head": {"num_cpus": 0, "memory_gb": 1, "gcs_port": 6397, "dashboard_port": 8279},
    "nodes": [
        {"name": "a-l20", "gpu_type": "L20", "num_gpus": 2, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1},
        {"name": "a-h20", "gpu_type": "H20", "num_gpus": 2, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1},
        {"name": "b-h20", "gpu_type": "H20", "num_gpus": 2, "s1": "s1-b", "s2": "s2-0", "memory_gb": 1},
    ],
})
HETERO = ServiceShape("chat", ("L20",), ("H20",), affinity=Scope.S1)


@pytest.fixture(scope="module")
def cluster():
    state = local_cluster.up(SPEC, temp_dir=TEMP_DIR)
    try:
        svc.connect(state.address)
        yield state
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def _live_pgs():
    from ray.util import placement_group_table

    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def test_tree_from_live_nodes(cluster):
    tree = build_tree(live_nodes())
    assert len(tree.nodes) == 3  # the head has no accelerator labels
    assert tree.domain("s1", "s1-a").tier is Tier.HIGH and tree.free_gpus(tree.domain("s1", "s1-a"), "L20") == 2


def test_placed_batch_lands_in_its_domain_on_its_types(cluster):
    from ray.util import placement_group_table, remove_placement_group

    plan = place(build_tree(live_nodes()), [ScaleRequest(HETERO, 1, 2)])
    action = plan.actions[0]
    assert (action.kind, action.domain) == (ActionKind.CREATE, "s1-a")
    pg = probe(action, HETERO, keep=True)
    try:
        nodes = {n["NodeID"]: n["Labels"] for n in __import__("ray").nodes()}
        placed = placement_group_table(pg)["bundles_to_node_id"]
        labels = [nodes[placed[i]] for i in range(3)]
        assert [lab["heteroscale.io/gpu-type"] for lab in labels] == ["L20", "H20", "H20"]
        assert {lab["heteroscale.io/s1"] for lab in labels} == {"s1-a"}
    finally:
        remove_placement_group(pg)


def test_infeasible_batch_leaves_nothing_behind(cluster):
    too_big = PlacementAction(ActionKind.CREATE, "chat", "chat-s1-a", Scope.S1, "s1-a", Tier.HIGH, "L20", "H20",
                              num_prefill=3, num_decode=1)  # s1-a has only 2 L20
    before = len(_live_pgs())
    assert probe(too_big, HETERO, timeout_s=3) is False
    assert len(_live_pgs()) == before
    # It would fit the cluster's L20s in total, but not inside one domain: the topology strategy holds.
    across = PlacementAction(ActionKind.CREATE, "chat", "x", Scope.S1, "s1-b", Tier.HIGH, "L20", "H20", 1, 1)
    assert probe(across, HETERO, timeout_s=3) is False  # s1-b has no L20


def test_window_between_probe_and_replica_start(cluster):
    """The probe is released before Serve starts replicas; a competitor taking the GPUs in between leaves the
    replicas pending (no half-built group is reported RUNNING) until capacity returns."""
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    action = place(build_tree(live_nodes()), [ScaleRequest(HETERO, 1, 1)]).actions[0]
    assert probe(action, HETERO) is True
    competitor = placement_group([{"GPU_H20": 2.0}], bundle_label_selector=[{"heteroscale.io/s1": "s1-a"}])
    assert competitor.wait(10)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, placement_group_bundles=[{"GPU_H20": 1.0}],
                      placement_group_bundle_label_selector=[{"heteroscale.io/s1": "s1-a",
                                                              "heteroscale.io/gpu-type": "H20"}])
    class Decode:
        def __call__(self):
            return "ok"

    from ray.serve.api import _run  # serve.run always waits for RUNNING; this deploys without waiting

    def app_status():
        return str(getattr(serve.status().applications["window"].status, "value", ""))

    try:
        _run(Decode.bind(), name="window", route_prefix=None, _blocking=False)
        time.sleep(8)
        assert app_status() != "RUNNING"
        remove_placement_group(competitor)
        deadline = time.time() + 60
        while app_status() != "RUNNING" and time.time() < deadline:
            time.sleep(1)
        assert app_status() == "RUNNING"
    finally:
        serve.delete("window")


def test_bundles_and_autoscaler_hint_shape(cluster):
    action = place(build_tree(live_nodes()), [ScaleRequest(HETERO, 1, 2)]).actions[0]
    bundles, selectors = probe_bundles(action, HETERO)
    assert bundles == [{"GPU_L20": 1.0}, {"GPU_H20": 1.0}, {"GPU_H20": 1.0}]
    assert selectors[0] == {"heteroscale.io/gpu-type": "L20", "heteroscale.io/s1": "s1-a"}
    assert request_target_shape(bundles, selectors, enabled=False) is False  # behind a config flag
    with pytest.raises(ValueError, match="one per bundle"):
        request_target_shape(bundles, selectors[:1], enabled=True)


def test_realize_scales_only_a_batch_that_fits(cluster):
    """probe -> scale: a fitting batch gets replicas pinned in its domain; an infeasible one gets nothing."""
    from ray import serve

    from placement.ray_adapter import realize, selectors_for

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Engine:
        def __call__(self):
            import ray

            return ray.get_runtime_context().get_node_labels()

    deployed = []

    def scale(action):  # what the controller does: set the DG's pinned deployments' replica counts
        for role, count in (("prefill", action.num_prefill), ("decode", action.num_decode)):
            gpu = action.prefill_gpu_type if role == "prefill" else action.decode_gpu_type
            app = Engine.options(name=f"{action.group}-{role}", num_replicas=count,
                                 placement_group_bundles=[{f"GPU_{gpu}": 1.0}],
                                 placement_group_bundle_label_selector=[selectors_for(action)[role]]).bind()
            name = f"{action.group}-{role}"
            deployed.append((name, serve.run(app, name=name, route_prefix=None)))

    fits = place(build_tree(live_nodes()), [ScaleRequest(HETERO, 1, 1)]).actions[0]
    too_big = PlacementAction(ActionKind.CREATE, "chat", "chat-big", Scope.S1, "s1-a", Tier.HIGH, "L20", "H20",
                              num_prefill=3, num_decode=1)
    before = len(_live_pgs())
    try:
        assert realize(too_big, HETERO, scale, timeout_s=3) is False
        assert deployed == [] and len(_live_pgs()) == before  # no placement group, no replica
        assert realize(fits, HETERO, scale) is True
        for name, handle in deployed:
            labels = handle.remote().result(timeout_s=60)
            assert labels["heteroscale.io/s1"] == fits.domain
            assert labels["heteroscale.io/gpu-type"] == ("L20" if name.endswith("prefill") else "H20")
    finally:
        for name, _ in deployed:
            serve.delete(name)
