"""Deployment groups: one prefill + one decode Serve deployment pinned to one network domain.

Pure functions only (no Ray, no vLLM): they turn a `ServiceSpec` and the cluster's node facts into per-DG,
per-role engine settings (GPU type picked from the role's preference list, label selectors, placement bundles,
engine kwargs and env). `serving.app` turns the result into Serve deployments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from common.config import RoleSpec, ServiceSpec
from common.vocab import DeploymentGroup, NodeInfo, Role, Scope, deployment_name, gpu_resource, label_selector


class PlacementError(ValueError):
    """A deployment group cannot be pinned: the message names the group, domain and what is missing."""


def nodes_in_domain(nodes: Iterable[NodeInfo], affinity: str, domain: str) -> list[NodeInfo]:
    if affinity == Scope.CLUSTER:
        return list(nodes)
    return [n for n in nodes if n.domain(affinity) == domain]


def resolve_gpu_type(nodes: Iterable[NodeInfo], affinity: str, domain: str, role: Role, spec: RoleSpec,
                     group: str) -> str:
    """First GPU type of the role's preference list that some node of the domain has enough of."""
    here = nodes_in_domain(nodes, affinity, domain)
    for gpu_type in spec.gpu_types:
        if any(n.gpu_type == gpu_type and n.total_gpus >= spec.gpus_per_replica for n in here):
            return gpu_type
    have = sorted({n.gpu_type for n in here if n.gpu_type})
    raise PlacementError(
        f"deployment group {group!r}: no node in {affinity} domain {domain!r} offers a {role.value} GPU type from "
        f"{list(spec.gpu_types)} with >= {spec.gpus_per_replica} GPUs per node (domain has {have or 'no nodes'})"
    )


@dataclass(frozen=True)
class RolePlan:
    """Everything needed to deploy one role of one DG."""

    group: str
    role: Role
    deployment_name: str
    num_replicas: int
    gpu_type: str
    bundle: Mapping[str, float]
    label_selector: Mapping[str, str]
    engine_kwargs: Mapping[str, Any]
    env: Mapping[str, str]
    nixl_port_base: int
    max_ongoing_requests: int


def engine_kwargs(service: ServiceSpec, model_path: str) -> dict[str, Any]:
    """vLLM engine kwargs shared by both roles (NIXL connector, device-specific options from config)."""
    eng = service.engine
    kv_transfer = {
        "kv_connector": eng.kv_connector,
        "kv_role": "kv_both",
        "kv_buffer_device": eng.kv_buffer_device,
    }
    if eng.kv_connector == "NixlConnector":
        kv_transfer["kv_connector_extra_config"] = {"backends": list(eng.nixl_backends)}
    kwargs: dict[str, Any] = {
        "tokenizer": model_path,
        "dtype": eng.dtype,
        "max_model_len": eng.max_model_len,
        "enforce_eager": eng.enforce_eager,
        "tensor_parallel_size": eng.tensor_parallel_size,
        "kv_transfer_config": kv_transfer,
        "disable_log_stats": False,
    }
    kwargs.update(eng.engine_kwargs)
    return kwargs


def role_env(service: ServiceSpec, role_spec: RoleSpec) -> dict[str, str]:
    eng = service.engine
    env = {"VLLM_LOGGING_LEVEL": "WARNING"}
    if eng.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(eng.cpu_kvcache_space_gb)
        if role_spec.cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = role_spec.cpu_threads_bind
    if eng.nixl_side_channel_host:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = eng.nixl_side_channel_host
    env.update(eng.env)
    return env


def plan_group(service: ServiceSpec, group: DeploymentGroup, slot: int, nodes: Iterable[NodeInfo],
               model_path: str) -> tuple[RolePlan, RolePlan]:
    """Per-role plans for one DG. `slot` is the DG's own (stable for its life, unique among live DGs) and spaces
    NIXL side-channel ports so co-located DGs never collide. A group with GPU types (placed by the controller's
    `place()`) is deployed on those, one owner for the choice; a group without (the service file's) gets each
    role's first preferred type present in its domain."""
    if slot < 0:
        raise ValueError(f"slot ({slot}) of deployment group {group.name!r} must be >= 0")
    nodes = list(nodes)
    plans = []
    for offset, role in enumerate((Role.PREFILL, Role.DECODE)):
        spec: RoleSpec = getattr(service.roles, role.value)
        gpu_type = group.gpu_type(role)  # what place() chose for a group the controller creates
        if gpu_type is None:  # a group of the service file: the role's first preferred type in the domain
            gpu_type = resolve_gpu_type(nodes, service.affinity, group.domain, role, spec, group.name)
        elif gpu_type not in spec.gpu_types:
            raise PlacementError(f"deployment group {group.name!r}: {role.value} GPU type {gpu_type!r} is not in "
                                 f"the role's gpu_types {list(spec.gpu_types)}")
        plans.append(
            RolePlan(
                group=group.name,
                role=role,
                deployment_name=deployment_name(service.name, group.name, role),
                num_replicas=group.count(role),
                gpu_type=gpu_type,
                bundle={"CPU": spec.num_cpus_per_replica, gpu_resource(gpu_type): float(spec.gpus_per_replica)},
                label_selector=label_selector(service.affinity, group.domain, gpu_type),
                engine_kwargs=engine_kwargs(service, model_path),
                env=role_env(service, spec),
                # 100 ports per (DG, role): Serve adds the replica rank x TP size to the base.
                nixl_port_base=service.engine.nixl_side_channel_port_base + 200 * slot + 100 * offset,
                max_ongoing_requests=spec.max_ongoing_requests,
            )
        )
    return plans[0], plans[1]
