import pytest

from common.config import load_service_spec
from serving.deployment_groups import (
    PlacementError,
    plan_group,
    resolve_gpu_type,
)
from common.vocab import DeploymentGroup, NodeInfo, Role
from tests.conftest import EXAMPLES

SERVICE = load_service_spec(EXAMPLES / "service-local.yaml")
NODES = [
    NodeInfo("n1", "L20", 2, 2, "s1-a", "s2-0"),
    NodeInfo("n2", "H20", 2, 2, "s1-a", "s2-0"),
    NodeInfo("n3", "H20", 2, 2, "s1-b", "s2-0"),  # s1-b has no L20: prefill must fall back to H20
]


def test_preferred_gpu_type_then_fallback():
    prefill = SERVICE.roles.prefill  # [L20, H20]
    assert resolve_gpu_type(NODES, "s1", "s1-a", Role.PREFILL, prefill, "g") == "L20"
    assert resolve_gpu_type(NODES, "s1", "s1-b", Role.PREFILL, prefill, "g") == "H20"


def test_unplaceable_group_names_domain_and_types():
    decode = SERVICE.roles.decode.model_copy(update={"gpu_types": ("H800",)})
    with pytest.raises(PlacementError, match=r"'g'.*domain 's1-a'.*\['H800'\].*\['H20', 'L20'\]"):
        resolve_gpu_type(NODES, "s1", "s1-a", Role.DECODE, decode, "g")
    too_big = SERVICE.roles.decode.model_copy(update={"gpus_per_replica": 4})
    with pytest.raises(PlacementError, match=">= 4 GPUs"):
        resolve_gpu_type(NODES, "s1", "s1-a", Role.DECODE, too_big, "g")


def test_plan_pins_both_roles_to_the_domain_and_their_gpu_type():
    prefill, decode = plan_group(SERVICE, SERVICE.deployment_groups[0], 0, NODES, "/m")
    assert prefill.label_selector == {"heteroscale.io/gpu-type": "L20", "heteroscale.io/s1": "s1-a"}
    assert decode.label_selector == {"heteroscale.io/gpu-type": "H20", "heteroscale.io/s1": "s1-a"}
    assert prefill.bundle["GPU_L20"] == 1 and decode.bundle["GPU_H20"] == 1
    assert prefill.deployment_name == "tiny-chat:dg-a:prefill"
    kv = decode.engine_kwargs["kv_transfer_config"]
    assert kv["kv_connector"] == "NixlConnector" and kv["kv_buffer_device"] == "cpu"
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert decode.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"


def test_gpu_options_come_from_config_not_code():
    gpu = SERVICE.engine.model_copy(update={"device": "cuda", "kv_buffer_device": "cuda",
                                            "nixl_side_channel_host": None})
    service = type(SERVICE)(**{**SERVICE.__dict__, "engine": gpu})
    prefill, _ = plan_group(service, service.deployment_groups[0], 0, NODES, "/m")
    assert prefill.engine_kwargs["kv_transfer_config"]["kv_buffer_device"] == "cuda"
    assert "VLLM_CPU_KVCACHE_SPACE" not in prefill.env and "VLLM_CPU_OMP_THREADS_BIND" not in prefill.env
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in prefill.env


def test_nixl_port_ranges_never_collide_across_groups_and_roles():
    groups = (SERVICE.deployment_groups[0], DeploymentGroup("dg-b", "tiny-chat", "s1", "s1-b", None, None, 1, 1))
    bases = []
    for i, g in enumerate(groups):
        bases += [p.nixl_port_base for p in plan_group(SERVICE, g, i, NODES, "/m")]
    assert len(set(bases)) == 4
    assert all(abs(a - b) >= 100 for a in bases for b in bases if a != b)


def test_cluster_affinity_has_no_domain_label():
    service = type(SERVICE)(**{**SERVICE.__dict__, "affinity": "cluster"})
    prefill, _ = plan_group(service, DeploymentGroup("x", "tiny-chat", "s1", "anything", None, None, 1, 1), 0, NODES, "/m")
    assert prefill.label_selector == {"heteroscale.io/gpu-type": "L20"}
