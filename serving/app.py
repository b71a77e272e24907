"""Build the Serve application of a P/D service: per deployment group a prefill and a decode deployment pinned
to the group's domain and GPU types, and one OpenAI ingress in front. Imports vLLM (through ray.llm).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterable

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig

from common.config import ServiceSpec
from common.vocab import NodeInfo
from serving.deployment_groups import RolePlan, plan_group
from serving.engines import DecodeServer, PrefillServer
from serving.ingress import PDIngressDeployment

logger = logging.getLogger(__name__)

INGRESS_NAME = "ingress"


def llm_config_for(service: ServiceSpec, plan: RolePlan, model_path: str) -> LLMConfig:
    gpu_key = next(k for k in plan.bundle if k != "CPU")
    return LLMConfig(
        model_loading_config={"model_id": service.model.id, "model_source": model_path},
        engine_kwargs=dict(plan.engine_kwargs),
        placement_group_config={"bundle_per_worker": {gpu_key: plan.bundle[gpu_key]}},
        deployment_config={
            # A fixed count (config now, the HeteroScale controller later): with num_replicas set, ray.llm drops
            # its default per-deployment autoscaling_config, which would scale P and D apart.
            "num_replicas": plan.num_replicas,
            "max_ongoing_requests": plan.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": plan.bundle["CPU"]},
            # One selector per bundle: the replica and its engine land on a node of the DG's domain and GPU type.
            "placement_group_bundle_label_selector": [dict(plan.label_selector)],
        },
        runtime_env={"env_vars": dict(plan.env)},
        experimental_configs={
            **({"stream_batching_interval_ms": service.engine.stream_batching_interval_ms}
               if service.engine.stream_batching_interval_ms is not None else {}),
            "NIXL_SIDE_CHANNEL_PORT_BASE": plan.nixl_port_base,
            "heteroscale_role": plan.role.value,
            "heteroscale_group": plan.group,
        },
        log_engine_metrics=True,
    )


def build_app(service: ServiceSpec, model_path: str, nodes: Iterable[NodeInfo]) -> Application:
    nodes = list(nodes)
    decode_apps, resolved = {}, []
    for index, group in enumerate(service.deployment_groups):
        prefill_plan, decode_plan = plan_group(service, group, index, nodes, model_path)
        resolved.append(replace(group, prefill_gpu_type=prefill_plan.gpu_type, decode_gpu_type=decode_plan.gpu_type))
        prefill_cfg = llm_config_for(service, prefill_plan, model_path)
        decode_cfg = llm_config_for(service, decode_plan, model_path)
        prefill_app = build_llm_deployment(
            prefill_cfg,
            deployment_cls=PrefillServer,
            override_serve_options={"name": prefill_plan.deployment_name},
        )
        decode_apps[group.name] = build_llm_deployment(
            decode_cfg,
            deployment_cls=DecodeServer,
            bind_kwargs={"prefill_server": prefill_app},
            override_serve_options={"name": decode_plan.deployment_name},
        )
        logger.info("DG %s in %s: prefill %dx %s, decode %dx %s", group.name, group.domain,
                    prefill_plan.num_replicas, prefill_plan.gpu_type, decode_plan.num_replicas, decode_plan.gpu_type)
    card = to_model_metadata(service.model.id, decode_cfg).model_dump()
    ingress = serve.deployment(
        PDIngressDeployment,
        name=INGRESS_NAME,
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(
        groups=decode_apps,
        deployment_groups=tuple(resolved),
        model_card=card,
        request_timeout_s=service.ingress.request_timeout_s,
        stream_idle_timeout_s=service.ingress.stream_idle_timeout_s,
        api_key=service.api_key(),
    )
