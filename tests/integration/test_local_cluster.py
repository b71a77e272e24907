"""Local labelled cluster (real `ray start` processes) and label pinning of DG deployments, with stub engines."""

import subprocess
import sys

import pytest

from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc
from common.config import load_service_spec, parse_cluster_spec
from serving.deployment_groups import PlacementError, plan_group
from common.vocab import DeploymentGroup
from placement.ray_adapter import live_nodes
from tests.conftest import EXAMPLES

TEMP_DIR = "/tmp/hsray-int"
SPEC = parse_cluster_spec({
    "head": {"num_cpus": 0, "memory_gb": 1, "gcs_port": 6393, "dashboard_port": 8277},
    "nodes": [
        {"name": "a-l20", "gpu_type": "L20", "num_gpus": 2, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1},
        {"name": "a-h20", "gpu_type": "H20", "num_gpus": 2, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1},
        {"name": "b-h20", "gpu_type": "H20", "num_gpus": 2, "s1": "s1-b", "s2": "s2-0", "memory_gb": 1},
    ],
})


@pytest.fixture(scope="module")
def cluster():
    # A process whose command line names a *different* dir sharing our prefix: `down` must leave it alone.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", TEMP_DIR + "2/x"])
    state = local_cluster.up(SPEC, temp_dir=TEMP_DIR)
    try:
        svc.connect(state.address)
        yield state, bystander
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)
        bystander.kill()


def test_nodes_carry_labels_and_fake_gpus(cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 1 + len(SPEC.nodes)
    by_name = {n["Labels"].get("heteroscale.io/node"): n for n in nodes}
    assert by_name["a-l20"]["Labels"]["heteroscale.io/gpu-type"] == "L20"
    assert by_name["b-h20"]["Labels"]["heteroscale.io/s1"] == "s1-b"
    assert by_name["a-h20"]["Resources"]["GPU_H20"] == 2.0
    assert local_cluster.is_running(TEMP_DIR)
    assert local_cluster.up(SPEC, temp_dir=TEMP_DIR) == cluster[0]  # idempotent: reused, not restarted


def test_dg_roles_land_in_their_domain_on_their_gpu_type(cluster):
    from ray import serve

    @serve.deployment
    class Stub:
        def __call__(self):
            import ray

            return ray.get_runtime_context().get_node_labels()

    service = load_service_spec(EXAMPLES / "service-local.yaml")
    facts = live_nodes()
    apps = {}
    for index, group in enumerate([DeploymentGroup("g-a", "tiny-chat", "s1", "s1-a", None, None, 1, 1),
                                   DeploymentGroup("g-b", "tiny-chat", "s1", "s1-b", None, None, 1, 1)]):
        for plan in plan_group(service, group, index, facts, "/unused"):
            apps[(group.name, plan.role.value)] = (plan, Stub.options(
                name=plan.deployment_name.replace(":", "-"),
                ray_actor_options={"num_cpus": 0},
                placement_group_bundles=[dict(plan.bundle)],
                placement_group_bundle_label_selector=[dict(plan.label_selector)],
            ).bind())
    try:
        for key, (plan, app) in apps.items():
            handle = serve.run(app, name=f"stub-{key[0]}-{key[1]}", route_prefix=None)
            labels = handle.remote().result(timeout_s=60)
            assert labels["heteroscale.io/gpu-type"] == plan.gpu_type, key
            assert labels["heteroscale.io/s1"] == ("s1-a" if key[0] == "g-a" else "s1-b"), key
        # s1-b has no L20: prefill fell back to its second choice, H20; s1-a got the preferred L20.
        assert apps[("g-b", "prefill")][0].gpu_type == "H20" and apps[("g-a", "prefill")][0].gpu_type == "L20"
    finally:
        for key in apps:
            serve.delete(f"stub-{key[0]}-{key[1]}")


def test_unplaceable_group_is_refused_before_deploying(cluster):
    service = load_service_spec(EXAMPLES / "service-local.yaml")
    big = service.roles.decode.model_copy(update={"gpus_per_replica": 3})
    roles = service.roles.model_copy(update={"decode": big})
    service = type(service)(**{**service.__dict__, "roles": roles})
    with pytest.raises(PlacementError, match=">= 3 GPUs"):
        plan_group(service, DeploymentGroup("g", "tiny-chat", "s1", "s1-a", None, None, 1, 1), 0, live_nodes(), "/unused")


PROMETHEUS_PORT = 9391


def test_prometheus_scrapes_every_ray_node(cluster):
    """A real Prometheus server (Debian's package, installed by `make install`) on loopback finds every Ray node
    through Ray's service-discovery file and scrapes its metrics; `down` stops it with the cluster."""
    import time

    from heteroscale_ray import prometheus

    url = prometheus.start(TEMP_DIR, ["127.0.0.1:1"], port=PROMETHEUS_PORT, progress=lambda *_: None)
    deadline, up = time.monotonic() + 90, []
    while time.monotonic() < deadline:  # bounded: a few scrape intervals
        up = prometheus.query(url, 'up{job="ray"} == 1')
        nodes = prometheus.query(url, "count by (NodeAddress) (ray_node_mem_total)")
        ingress = prometheus.query(url, 'up{job="heteroscale-ingress"}')
        if len(up) >= 1 + len(SPEC.nodes) and nodes and ingress:
            break
        time.sleep(2)
    assert len(up) >= 1 + len(SPEC.nodes), up  # head + every node's metrics agent
    assert nodes, "no ray_node_mem_total series scraped"
    assert [s["value"][1] for s in ingress] == ["0"]  # nothing listens there: reported down, not missing
    with pytest.raises(ValueError, match="parse error"):
        prometheus.query(url, "sum(")


def test_down_stops_only_our_processes(cluster):
    state, bystander = cluster
    svc.disconnect()
    stopped = local_cluster.down(temp_dir=TEMP_DIR)
    assert stopped > 0
    assert not local_cluster.is_running(TEMP_DIR)
    assert local_cluster._our_processes(TEMP_DIR) == []
    assert bystander.poll() is None  # still running
    import socket

    with socket.socket() as sock:  # Prometheus (started under this temp dir) went with the cluster
        assert sock.connect_ex(("127.0.0.1", PROMETHEUS_PORT)) != 0
