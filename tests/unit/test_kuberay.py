"""deploy/kuberay/heteroscale.yaml: the RayCluster spec validates against the RayService CRD schema (its
rayClusterConfig is the same RayClusterSpec), and the worker groups' Ray labels, node selectors and GPU resources
agree with each other and with the service file, as `heteroscale validate` checks them."""

import copy
import json

import pytest
import yaml

from common.config import ConfigError, check_service_fits_cluster, parse_cluster_spec, parse_service_spec
from common.vocab import LABEL_GPU_TYPE, LABEL_S1, LABEL_S2, gpu_resource
from tests.conftest import ROOT

MANIFEST = ROOT / "deploy" / "kuberay" / "heteroscale.yaml"
CRD = ROOT.parent / "shared" / "reference" / "kuberay" / "ray.io_rayservices.yaml"
DOCS = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def crd_schema() -> dict:
    if not CRD.exists():
        pytest.skip("shared/reference/kuberay not beside this checkout")
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def cluster_from(raycluster: dict):
    """The cluster spec `heteroscale validate` would check: one node per worker replica, from its Ray labels and
    resources; and every group's labels, node selector and GPU counts consistent."""
    nodes, node_types = [], []
    for group in raycluster["spec"]["workerGroupSpecs"]:
        name, labels, params = group["groupName"], group["labels"], group["rayStartParams"]
        assert "labels" not in params, f"{name}: KubeRay rejects rayStartParams.labels"
        gpu_type = labels[LABEL_GPU_TYPE]
        selector = group["template"]["spec"]["nodeSelector"]
        assert {k: selector.get(k) for k in (LABEL_GPU_TYPE, LABEL_S1)} == {k: labels[k] for k in (LABEL_GPU_TYPE, LABEL_S1)}, name
        resources = json.loads(json.loads(params["resources"]))  # rayStartParams take a quoted JSON string
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(params["num-gpus"]) == resources[gpu_resource(gpu_type)] == int(limits["nvidia.com/gpu"]), name
        assert group["maxReplicas"] > group["replicas"] >= group["minReplicas"], name  # room to autoscale
        node = {"gpu_type": gpu_type, "num_gpus": resources[gpu_resource(gpu_type)], "s1": labels[LABEL_S1],
                "s2": labels[LABEL_S2]}
        nodes += [{"name": f"{name}-{i}", **node} for i in range(group["replicas"])]
        node_types.append({"name": name, **node, "max_nodes": group["maxReplicas"] - group["replicas"]})
    return parse_cluster_spec({"nodes": nodes, "node_types": node_types}, str(MANIFEST))


def service_from(configmap: dict):
    return parse_service_spec(yaml.safe_load(configmap["data"]["service.yaml"]), f"{MANIFEST}:ConfigMap")


def test_the_raycluster_spec_validates_against_the_rayservice_crd_schema():
    import jsonschema

    schema = crd_schema()
    spec = DOCS["RayCluster"]["spec"]
    jsonschema.validate(spec, schema["properties"]["spec"]["properties"]["rayClusterConfig"])
    jsonschema.validate({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
                         "spec": {"rayClusterConfig": spec}}, schema)
    broken = copy.deepcopy(spec)
    broken["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema["properties"]["spec"]["properties"]["rayClusterConfig"])
    # a head restart keeps the cluster only with GCS fault tolerance (schema-checked: a wrong backend fails)
    assert set(spec["gcsFaultToleranceOptions"]) <= set(
        schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["gcsFaultToleranceOptions"]
        ["properties"])
    broken = copy.deepcopy(spec)
    broken["gcsFaultToleranceOptions"]["backend"] = "etcd"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema["properties"]["spec"]["properties"]["rayClusterConfig"])


def test_worker_groups_and_the_service_file_agree_as_heteroscale_validate_checks():
    cluster = cluster_from(DOCS["RayCluster"])
    service = service_from(DOCS["ConfigMap"])
    assert (service.engine.device, service.engine.kv_buffer_device) == ("cuda", "cuda")
    assert {(n.gpu_type, n.s1) for n in cluster.nodes} == {(t, s) for t in ("L20", "H20") for s in ("s1-a", "s1-b")}
    check_service_fits_cluster(service, cluster)  # raises ConfigError naming the group and domain otherwise
    assert DOCS["RayCluster"]["spec"]["enableInTreeAutoscaling"] is True
    assert DOCS["RayCluster"]["spec"]["autoscalerOptions"]["version"] == "v2"
    # the controller's node supply names every worker group, with its labels, size and maxReplicas
    groups = {(g["labels"][LABEL_GPU_TYPE], g["labels"][LABEL_S1]): g for g in DOCS["RayCluster"]["spec"]["workerGroupSpecs"]}
    supply = service.autoscaling.node_supply.node_types
    assert {(t.gpu_type, t.s1) for t in supply} == set(groups)
    assert all(t.max_nodes == groups[(t.gpu_type, t.s1)]["maxReplicas"] for t in supply)
    (job,) = DOCS["Job"]["spec"]["template"]["spec"]["containers"]
    mount = job["volumeMounts"][0]["mountPath"]
    assert job["command"][:2] == ["heteroscale", "deploy"] and job["command"][-1] == f"{mount}/service.yaml"


def test_a_node_supply_entry_with_no_worker_group_is_caught():
    service = yaml.safe_load(DOCS["ConfigMap"]["data"]["service.yaml"])
    service["autoscaling"]["node_supply"]["node_types"][0]["num_gpus"] = 4  # no worker group has 4 GPUs
    with pytest.raises(ConfigError, match="node_supply.node_types.0: no node type"):
        check_service_fits_cluster(parse_service_spec(service), cluster_from(DOCS["RayCluster"]))


def test_a_group_in_a_domain_with_no_worker_group_is_caught():
    service = yaml.safe_load(DOCS["ConfigMap"]["data"]["service.yaml"])
    service["deployment_groups"][0]["domain"] = "s1-z"
    with pytest.raises(ConfigError, match="s1-z"):
        check_service_fits_cluster(parse_service_spec(service), cluster_from(DOCS["RayCluster"]))
