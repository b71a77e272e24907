"""Build the Serve applications of a P/D service: one application per deployment group (DG) with a prefill and
a decode deployment pinned to the DG's domain and GPU types, and one ingress application in front.

A DG per application lets the controller add or remove a DG (`serve.run` / `serve.delete` of that application)
without redeploying, and so restarting, the replicas of any other DG; each DG application has
`external_scaler_enabled` so the controller sets its replica targets. Imports vLLM (through ray.llm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from common.config import ServiceSpec
from common.vocab import INGRESS_DEPLOYMENT, DeploymentGroup, NodeInfo, Role, controller_name, group_app_name
from common.wire import ENGINE_OPTIONS_KEY, EngineOptions, RoutingEntry
from serving.deployment_groups import RolePlan, plan_group
from serving.engines import DecodeServer, PrefillServer
from serving.ingress import PDIngressDeployment
from serving.ray_llm import to_model_metadata

logger = logging.getLogger(__name__)

ROUTER_CLASS = "serving.routing:AdmittedReplicaRouter"


def _controlled(service: ServiceSpec) -> bool:
    return service.autoscaling is not None and service.autoscaling.enabled


def _report_interval_s(service: ServiceSpec) -> float:
    return service.autoscaling.report_interval_s if service.autoscaling else 1.0


def llm_config_for(service: ServiceSpec, plan: RolePlan, model_path: str,
                   serve_autoscaling: Mapping[str, Any] | None = None) -> LLMConfig:
    """`serve_autoscaling`: instead of a fixed count, Ray Serve's own per-deployment `autoscaling_config`
    (the baseline of bench/scripts/live_vs_serve_autoscaling.py; not with a HeteroScale controller)."""
    gpu_key = next(k for k in plan.bundle if k != "CPU")
    controlled, interval = _controlled(service), _report_interval_s(service)
    deployment_config = {
        # A fixed count at deploy; the HeteroScale controller changes it through Serve's external scaling. With
        # num_replicas set, ray.llm drops its default per-deployment autoscaling_config (it would scale P, D apart).
        "num_replicas": plan.num_replicas,
        "max_ongoing_requests": plan.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": plan.bundle["CPU"]},
        # One selector per bundle: the replica and its engine land on a node of the DG's domain and GPU type.
        "placement_group_bundle_label_selector": [dict(plan.label_selector)],
        # A terminated replica finishes what it holds (longer than any request may take).
        "graceful_shutdown_timeout_s": service.drain_timeout_s(),
    }
    if serve_autoscaling is not None:
        if controlled:
            raise ValueError(f"service {service.name!r}: Serve's autoscaling_config and the HeteroScale controller "
                             "exclude each other (external scaling forbids an autoscaling_config)")
        deployment_config.pop("num_replicas")
        deployment_config["autoscaling_config"] = dict(serve_autoscaling)
    if controlled:
        deployment_config["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs={"default_routable": False},
            request_routing_stats_period_s=interval, request_routing_stats_timeout_s=max(5.0, 5 * interval))
    return LLMConfig(
        model_loading_config={"model_id": service.model.id, "model_source": model_path},
        engine_kwargs=dict(plan.engine_kwargs),
        placement_group_config={"bundle_per_worker": {gpu_key: plan.bundle[gpu_key]}},
        deployment_config=deployment_config,
        runtime_env={"env_vars": dict(plan.env)},
        experimental_configs={
            **({"stream_batching_interval_ms": service.engine.stream_batching_interval_ms}
               if service.engine.stream_batching_interval_ms is not None else {}),
            "NIXL_SIDE_CHANNEL_PORT_BASE": plan.nixl_port_base,
            ENGINE_OPTIONS_KEY: EngineOptions(
                service.name, plan.role.value, plan.group, controller_name(service.name) if controlled else None,
                interval, service.engine.prefill_attempts, service.engine.prefill_probe_interval_s).to_wire(),
        },
        log_engine_metrics=True,
    )


@dataclass(frozen=True)
class GroupApp:
    """One DG's application, ready for `serve.run(app, name=app_name, route_prefix=None, ...)`."""

    app: Application
    app_name: str
    group: DeploymentGroup  # GPU types resolved
    slot: int
    decode_deployment: str
    decode_config: LLMConfig


def build_group_app(service: ServiceSpec, group: DeploymentGroup, slot: int, model_path: str,
                    nodes: Iterable[NodeInfo],
                    serve_autoscaling: Mapping[Role, Mapping[str, Any]] | None = None) -> GroupApp:
    """`serve_autoscaling`: Ray Serve's own `autoscaling_config` per role (the baseline of
    bench/scripts/live_vs_serve_autoscaling.py), both roles or neither."""
    if serve_autoscaling is not None and set(serve_autoscaling) != set(Role):
        raise ValueError(f"serve_autoscaling needs a config for each role, got {sorted(map(str, serve_autoscaling))}")
    per_role = serve_autoscaling or {}
    prefill_plan, decode_plan = plan_group(service, group, slot, list(nodes), model_path)
    prefill_app = build_llm_deployment(llm_config_for(service, prefill_plan, model_path, per_role.get(Role.PREFILL)),
                                       deployment_cls=PrefillServer,
                                       override_serve_options={"name": prefill_plan.deployment_name})
    decode_cfg = llm_config_for(service, decode_plan, model_path, per_role.get(Role.DECODE))
    decode_app = build_llm_deployment(decode_cfg, deployment_cls=DecodeServer,
                                      bind_kwargs={"prefill_server": prefill_app},
                                      override_serve_options={"name": decode_plan.deployment_name})
    resolved = replace(group, prefill_gpu_type=prefill_plan.gpu_type, decode_gpu_type=decode_plan.gpu_type)
    logger.info("DG %s in %s (slot %d): prefill %dx %s, decode %dx %s", group.name, group.domain, slot,
                prefill_plan.num_replicas, prefill_plan.gpu_type, decode_plan.num_replicas, decode_plan.gpu_type)
    return GroupApp(decode_app, group_app_name(service.name, group.name), resolved, slot,
                    decode_plan.deployment_name, decode_cfg)


def run_group_app(service: ServiceSpec, built: GroupApp) -> None:
    """Deploy one DG's application without waiting for it (the caller watches its status)."""
    from serving.ray_llm import run_app  # serve.run always waits for RUNNING

    run_app(built.app, _blocking=False, name=built.app_name, route_prefix=None,
         external_scaler_enabled=_controlled(service))


def build_ingress_app(service: ServiceSpec, groups: Iterable[GroupApp]) -> Application:
    groups = list(groups)
    if not groups:
        raise ValueError(f"service {service.name!r} needs at least one deployment group")
    card = to_model_metadata(service.model.id, groups[0].decode_config).model_dump()
    table = {g.group.name: RoutingEntry(g.app_name, g.decode_deployment, g.group.num_decode, g.group)
             for g in groups}
    ingress = serve.deployment(PDIngressDeployment, name=INGRESS_DEPLOYMENT, num_replicas=1,
                               max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(
        groups=table,
        model_card=card,
        request_timeout_s=service.ingress.request_timeout_s,
        stream_idle_timeout_s=service.ingress.stream_idle_timeout_s,
        max_inflight_per_decode_replica=service.ingress.max_inflight_per_decode_replica,
        retry_after_s=service.ingress.retry_after_s,
        api_key=service.api_key(),
        controller=controller_name(service.name) if _controlled(service) else None,
        report_interval_s=_report_interval_s(service),
        service=service.name,
    )
