import copy

import pytest
import yaml

from common.config import (
    ConfigError,
    check_service_fits_cluster,
    load_cluster_spec,
    load_service_spec,
    parse_cluster_spec,
    parse_service_spec,
)
from tests.conftest import EXAMPLES

CLUSTER = yaml.safe_load((EXAMPLES / "cluster-local.yaml").read_text())
SERVICE = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())


def test_example_cluster_fits_the_machine_and_has_the_required_shape():
    spec = load_cluster_spec(EXAMPLES / "cluster-local.yaml")
    assert len(spec.nodes) >= 4
    assert len({n.s1 for n in spec.nodes}) >= 2 and len({n.s2 for n in spec.nodes}) == 1
    assert len({n.gpu_type for n in spec.nodes}) >= 2
    assert spec.total_memory_gb() <= 24
    node = spec.nodes[0]
    assert node.labels()["heteroscale.io/gpu-type"] == node.gpu_type
    assert node.resources() == {f"GPU_{node.gpu_type}": float(node.num_gpus)}


def test_example_service_fits_example_cluster():
    service = load_service_spec(EXAMPLES / "service-local.yaml")
    check_service_fits_cluster(service, load_cluster_spec(EXAMPLES / "cluster-local.yaml"))
    assert service.engine.kv_connector == "NixlConnector"
    assert service.engine.kv_buffer_device == "cpu"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["nodes"][0].update(gpu_type="H 20"), "nodes.0.gpu_type"),
        (lambda c: c["nodes"][0].update(num_gpus=0), "nodes.0.num_gpus"),
        (lambda c: c["nodes"][1].update(name=c["nodes"][0]["name"]), "repeated"),
        (lambda c: c["nodes"][0].update(s2="s2-other"), "appears under two S2 domains"),
        (lambda c: c["nodes"][0].update(colour="red"), "nodes.0.colour"),
        (lambda c: c.update(nodes=[]), "nodes"),
        (lambda c: c["nodes"][0].update(s1="S1_A"), "nodes.0.s1"),
    ],
)
def test_cluster_errors_name_the_bad_field(mutate, expected):
    data = copy.deepcopy(CLUSTER)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_cluster_spec(data, "test.yaml")
    assert expected in str(err.value)
    assert "test.yaml" in str(err.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s["deployment_groups"][0].update(prefill_replicas=0), "must both be 0"),
        (lambda s: s.update(affinity="rack"), "affinity"),
        (lambda s: s["roles"]["prefill"].update(gpu_types=[]), "roles.prefill.gpu_types"),
        (lambda s: s["engine"].update(kv_buffer_device="tpu"), "engine.kv_buffer_device"),
        (lambda s: s["deployment_groups"].append(dict(s["deployment_groups"][0])), "repeated"),
        (lambda s: s["ingress"].update(request_timeout_s=0), "ingress.request_timeout_s"),
    ],
)
def test_service_errors_name_the_bad_field(mutate, expected):
    data = copy.deepcopy(SERVICE)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_service_spec(data)
    assert expected in str(err.value)


def test_service_domain_and_gpu_types_checked_against_cluster():
    cluster = load_cluster_spec(EXAMPLES / "cluster-local.yaml")
    data = copy.deepcopy(SERVICE)
    data["deployment_groups"][0]["domain"] = "s1-zz"
    with pytest.raises(ConfigError, match="'s1-zz' is not a known S1 domain"):
        check_service_fits_cluster(parse_service_spec(data), cluster)
    data = copy.deepcopy(SERVICE)
    data["roles"]["decode"]["gpu_types"] = ["H800"]
    with pytest.raises(ConfigError, match=r"no node with a decode GPU type \['H800'\]"):
        check_service_fits_cluster(parse_service_spec(data), cluster)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cluster_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_spec(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_cluster_spec(bad)


def test_api_key_from_env_or_config(monkeypatch):
    data = copy.deepcopy(SERVICE)
    monkeypatch.delenv("HETEROSCALE_API_KEY", raising=False)
    assert parse_service_spec(data).api_key() is None
    monkeypatch.setenv("HETEROSCALE_API_KEY", "k1")
    assert parse_service_spec(data).api_key() == "k1"
    data["ingress"]["api_key"] = "k2"
    assert parse_service_spec(data).api_key() == "k2"


def test_free_ports_are_distinct():
    from heteroscale_ray.local_cluster import _free_ports

    for _ in range(50):
        ports = _free_ports(4)
        assert len(set(ports)) == 4


SUPPLY = {"node_types": [{"gpu_type": t, "num_gpus": 1, "s1": "s1-b", "s2": "s2-0", "max_nodes": 1} for t in ("L20", "H20")]}


def test_node_types_and_the_services_node_supply_are_checked_against_each_other():
    cluster = load_cluster_spec(EXAMPLES / "cluster-local-supply.yaml")
    assert [t.max_nodes for t in cluster.node_types] == [1, 1] and cluster.total_memory_gb() <= 24
    data = copy.deepcopy(SERVICE)
    data["autoscaling"]["node_supply"] = SUPPLY
    check_service_fits_cluster(parse_service_spec(data), cluster)
    data["autoscaling"]["node_supply"]["node_types"][0]["max_nodes"] = 2
    with pytest.raises(ConfigError, match=r"node_types.0: max_nodes \(2\) is more than the cluster can hold"):
        check_service_fits_cluster(parse_service_spec(data), cluster)
    data["autoscaling"]["node_supply"]["node_types"][0]["s1"] = "s1-z"
    with pytest.raises(ConfigError, match="no node type of the cluster has 1x L20 in s1-z/s2-0"):
        check_service_fits_cluster(parse_service_spec(data), cluster)


@pytest.mark.parametrize("node_types, expected", [
    ([], "at least one entry in `nodes` or `node_types`"),
    ([{"name": "t", "gpu_type": "L20", "num_gpus": 1, "s1": "s1-b", "s2": "s2-0", "max_nodes": 1, "min_nodes": 2}],
     r"min_nodes \(2\) must be <= max_nodes \(1\)"),
    ([{"name": "t", "gpu_type": "L20", "num_gpus": 1, "s1": "s1-b", "s2": "s2-0"}], "node_types.0.max_nodes"),
])
def test_bad_node_types_name_the_field(node_types, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_cluster_spec({"nodes": [], "node_types": node_types})
