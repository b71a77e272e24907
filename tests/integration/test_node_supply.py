"""Node supply on a real Ray cluster: Ray's autoscaler v2 with its fake multi-node provider and labelled node
types (`heteroscale up` with `node_types`). A scale-out that fits nowhere makes the controller ask for the
service's whole target shape (`request_resources` with bundle label selectors); labelled nodes of the right
types join in the right S1, and the next cycles place the new deployment group there whole (all-or-nothing
probe). The controller is the real one; its Serve stand-in holds one real placement group per replica, pinned
like the real replicas (stub engines, as integration tests may use)."""

from __future__ import annotations

import time

import pytest

from common.config import parse_cluster_spec
from common.vocab import LABEL_GPU_TYPE, LABEL_S1, Role, group_app_name
from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc
from placement.ray_adapter import live_nodes, realize, request_supply
from tests.fakes import DG_A, SERVICE, FakeServe, Harness

TEMP_DIR = "/tmp/hsray-supply"
NODE = {"num_gpus": 1, "s2": "s2-0", "num_cpus": 1, "memory_gb": 1}
SPEC = parse_cluster_spec({
    "head": {"num_cpus": 0, "memory_gb": 1, "gcs_port": 6399, "dashboard_port": 8281},
    "nodes": [{"name": "a-l20", "gpu_type": "L20", "s1": "s1-a", **NODE},
              {"name": "a-h20", "gpu_type": "H20", "s1": "s1-a", **NODE}],
    "node_types": [{"name": "b-l20", "gpu_type": "L20", "s1": "s1-b", "max_nodes": 1, **NODE},
                   {"name": "b-h20", "gpu_type": "H20", "s1": "s1-b", "max_nodes": 1, **NODE}],
})
SUPPLY = {"node_types": [{"gpu_type": t, "num_gpus": 1, "s1": "s1-b", "s2": "s2-0", "max_nodes": 1}
                         for t in ("L20", "H20")]}


class PlacementGroupServe(FakeServe):
    """FakeServe whose replicas hold real resources: one placement group per replica, pinned to the DG's domain
    and GPU type. Nodes, probes and node requests are the live ones."""

    def __init__(self):
        super().__init__()
        self.pgs: dict[str, object] = {}

    def deploy_group(self, spec, group, slot, model_path):
        from ray.util.placement_group import placement_group

        super().deploy_group(spec, group, slot, model_path)
        for role in Role:
            dep = next(d for d in self.apps[group_app_name(SERVICE, group.name)] if d.endswith(role.value))
            for rid in self.apps[group_app_name(SERVICE, group.name)][dep]:
                gpu = group.gpu_type(role)
                self.pgs[rid] = placement_group([{f"GPU_{gpu}": 1.0}], bundle_label_selector=[group.selector(role)])
                assert self.pgs[rid].wait(30), f"replica {rid} of {group.name} did not get its GPU"

    def nodes(self):
        return live_nodes()

    def realize(self, action, shape, scale, timeout_s):
        self.calls.append(("probe", action.group, action.num_prefill, action.num_decode))
        return realize(action, shape, scale, timeout_s=timeout_s)

    def request_nodes(self, service, bundles, selectors):
        self.calls.append(("request_nodes", len(bundles)))
        request_supply(service, bundles, selectors)


@pytest.fixture(scope="module")
def cluster():
    state = local_cluster.up(SPEC, temp_dir=TEMP_DIR)
    try:
        svc.connect(state.address)
        yield state
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def test_a_scale_out_that_fits_nowhere_gets_labelled_nodes_and_the_group_lands_whole(cluster):
    import ray
    from ray.util import placement_group_table

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 3  # head + the two started nodes; the node types start with none
    serve = PlacementGroupServe()
    serve.deploy_group(None, DG_A, 0, "/m")  # dg-a fills s1-a
    serve.calls.clear()
    h = Harness(serve=serve, node_supply=SUPPLY)
    entries = h.run(10, decode_tps_each=180)  # D = 2, P = 2: nothing fits in the cluster as it is
    asked = [e["supply"] for e in entries if e.get("supply")]
    assert asked and asked[0]["added"] == [{"domain": "s1-b", "kind": "create", "num_prefill": 1, "num_decode": 1}]
    assert ("request_nodes", 4) in serve.calls  # the whole shape: dg-a's two instances + the new group's two
    assert not any(c[0] == "deploy" for c in serve.calls)

    deadline = time.monotonic() + 120
    created = []
    while not created and time.monotonic() < deadline:
        h.run(5, decode_tps_each=180)
        created = [c for c in serve.calls if c[0] == "deploy"]
        time.sleep(1)
    assert created, f"no group was placed on supplied nodes; calls: {serve.calls[-6:]}"
    joined = {n["NodeID"]: n["Labels"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in alive}
    assert sorted((lab[LABEL_GPU_TYPE], lab[LABEL_S1]) for lab in joined.values()) == [("H20", "s1-b"), ("L20", "s1-b")]
    # the new group is whole (one prefill and one decode) and every replica of it sits on a joined node
    new_app = group_app_name(SERVICE, created[0][1])
    replicas = [rid for ids in serve.apps[new_app].values() for rid in ids]
    assert len(replicas) == 2
    for rid in replicas:
        (node_id,) = placement_group_table(serve.pgs[rid])["bundles_to_node_id"].values()
        assert node_id in joined
    # every probe before the nodes joined failed whole: no other group, no half group
    assert set(serve.apps) == {group_app_name(SERVICE, "dg-a"), new_app}
