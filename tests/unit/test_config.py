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
        (lambda c: c.setdefault("head", {}).update(gcs_port=6389, redis_port=6389), "gcs_port=6389, redis_port=6389"),
        (lambda c: c.setdefault("head", {}).update(redis_port=80), "head.redis_port"),
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
        (lambda s: s["deployment_groups"][0].update(prefill_replicas=0), "prefill_replicas: Input should be greater than or equal to 1"),
        (lambda s: s["deployment_groups"][0].update(prefill_replicas=0, decode_replicas=0), "greater than or equal to 1"),
        (lambda s: s.update(affinity="rack"), "affinity"),
        (lambda s: s["roles"]["prefill"].update(gpu_types=[]), "roles.prefill.gpu_types"),
        (lambda s: s["engine"].update(kv_buffer_device="tpu"), "engine.kv_buffer_device"),
        (lambda s: s["deployment_groups"].append(dict(s["deployment_groups"][0])), "repeated"),
        (lambda s: s["ingress"].update(request_timeout_s=0), "ingress.request_timeout_s"),
        (lambda s: s.update(name="chat--b"), "'chat--b' must not contain '--'"),
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


def test_free_ports_are_distinct_and_below_the_ephemeral_range():
    from heteroscale_ray.local_cluster import PORT_FLOOR, _ephemeral_low, _free_ports

    low = _ephemeral_low()
    for _ in range(50):
        ports = _free_ports(4)
        assert len(set(ports)) == 4
        if low is not None and low - PORT_FLOOR >= 1000:  # no outgoing connection is given these
            assert all(PORT_FLOOR <= p < low for p in ports), (ports, low)


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


JUNK = [None, 0, -1, 10**30, 1.5, float("nan"), float("inf"), "", "x" * 300, "H 20", [], [1, None], {}, {"a": None},
        True]


def _paths(node, prefix=()):
    """Every (path, value) of a nested YAML document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _with(doc, path, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize("example, parse", [(CLUSTER, parse_cluster_spec), (SERVICE, parse_service_spec)],
                         ids=["cluster", "service"])
def test_any_junk_in_any_field_is_a_valid_config_or_one_error_naming_the_field(example, parse):
    """Property over the example files: one field (or the whole document, or a new key) replaced with junk of
    every type gives a config or a ConfigError whose message names where, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    paths = [p for p, _ in _paths(example)]

    @settings(max_examples=300, deadline=2000, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(paths), st.sampled_from(JUNK), st.booleans())
    def check(path, junk, add_key):
        doc = _with(example, (*path, "surprise") if add_key and isinstance(_at(example, path), dict) else path, junk)
        try:
            parse(doc) if isinstance(doc, dict) else parse({"doc": doc})
        except ConfigError as err:
            text = str(err)
            named = [str(p) for p in path if not isinstance(p, int)]
            assert text.startswith("invalid config") or "autoscaling" in text, text
            assert not named or any(n in text for n in named + ["surprise", "top level", "doc"]), (path, text)

    check()


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc
