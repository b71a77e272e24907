"""User-facing configuration: the local cluster spec, the service spec and the fleet spec (services sharing a
cluster, with priorities and a GPU budget), validated once, frozen afterwards.

YAML is parsed with pydantic (extra keys are rejected, every error names its field path) and converted into
frozen dataclasses that the rest of the code uses (deployment groups become `common.vocab.DeploymentGroup`).
Part of the shared leaf: imports only `common.vocab`, never Ray, vLLM or another package of the project.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.defaults import AUTOSCALING as D
from common.vocab import LABEL_GPU_TYPE, LABEL_NODE, LABEL_S1, LABEL_S2, DeploymentGroup, gpu_resource

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field and the bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be lowercase letters, digits and '-', 1-42 chars")
    if "--" in value:  # it joins a service and a group in Serve application names (`<service>--<group>`)
        raise ValueError(f"{kind} {value!r} must not contain '--' (it separates service and group in app names)")
    return value


# --------------------------------------------------------------------------------------------------------------
# Cluster spec
# --------------------------------------------------------------------------------------------------------------


class HeadSpec(_Strict):
    num_cpus: int = Field(0, ge=0, description="Ray logical CPUs on the head (Serve controller/proxy need none)")
    memory_gb: float = Field(2.0, gt=0)
    object_store_memory_mb: int = Field(256, ge=78)
    dashboard_port: int = Field(8265, ge=1024, le=65535)
    gcs_port: int = Field(6389, ge=1024, le=65535)
    redis_port: int | None = Field(None, ge=1024, le=65535, description=(
        "GCS fault tolerance: the GCS keeps its tables in a redis-server started with the cluster on this "
        "loopback port (password-protected), so a restarted GCS finds the cluster again"))

    @model_validator(mode="after")
    def _distinct_ports(self) -> "HeadSpec":
        ports = {"gcs_port": self.gcs_port, "dashboard_port": self.dashboard_port, "redis_port": self.redis_port}
        taken = [k for k, v in ports.items() if v is not None and list(ports.values()).count(v) > 1]
        if taken:
            raise ValueError(f"head ports must differ: {', '.join(f'{k}={ports[k]}' for k in taken)}")
        return self


class NodeSpec(_Strict):
    name: str
    gpu_type: str
    num_gpus: int = Field(ge=1, description="fake accelerators (custom resource GPU_<type>)")
    s1: str = Field(description="S1 (mini-pod) switch domain")
    s2: str = Field(description="S2 (big-pod) switch domain")
    num_cpus: int = Field(1, ge=1, description="Ray logical CPUs (scheduling slots, not physical cores)")
    memory_gb: float = Field(4.0, gt=0)
    object_store_memory_mb: int = Field(256, ge=78)

    @field_validator("name", "s1", "s2")
    @classmethod
    def _names(cls, value: str, info) -> str:
        return _check_name(info.field_name, value)

    @field_validator("gpu_type")
    @classmethod
    def _gpu(cls, value: str) -> str:
        if not _GPU_TYPE.match(value):
            raise ValueError(f"gpu_type {value!r} must be letters, digits or '_' (1-32 chars)")
        return value


class NodeTypeSpec(NodeSpec):
    """A node type Ray's cluster autoscaler (v2, its fake multi-node provider here) adds on demand."""

    min_nodes: int = Field(0, ge=0, description="nodes of this type the autoscaler keeps at least")
    max_nodes: int = Field(ge=1, le=16, description="nodes of this type the autoscaler may run at most")

    @model_validator(mode="after")
    def _counts(self) -> "NodeTypeSpec":
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) must be <= max_nodes ({self.max_nodes})")
        return self


class ClusterSpecModel(_Strict):
    head: HeadSpec = HeadSpec()
    nodes: list[NodeSpec] = Field(default_factory=list, description="nodes started with the cluster")
    node_types: list[NodeTypeSpec] = Field(default_factory=list,
                                           description="nodes the cluster autoscaler adds on demand")

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterSpecModel":
        if not self.nodes and not self.node_types:
            raise ValueError("the cluster needs at least one entry in `nodes` or `node_types`")
        names = [n.name for n in [*self.nodes, *self.node_types]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node and node type names must be unique; repeated: {dupes}")
        s1_parent: dict[str, str] = {}
        for node in [*self.nodes, *self.node_types]:
            parent = s1_parent.setdefault(node.s1, node.s2)
            if parent != node.s2:
                raise ValueError(
                    f"S1 domain {node.s1!r} appears under two S2 domains ({parent!r} and {node.s2!r}); "
                    "an S1 switch belongs to exactly one S2"
                )
        return self


@dataclass(frozen=True)
class Node:
    name: str
    gpu_type: str
    num_gpus: int
    s1: str
    s2: str
    num_cpus: int
    memory_gb: float
    object_store_memory_mb: int

    def labels(self) -> dict[str, str]:
        return {LABEL_GPU_TYPE: self.gpu_type, LABEL_S1: self.s1, LABEL_S2: self.s2, LABEL_NODE: self.name}

    def resources(self) -> dict[str, float]:
        return {gpu_resource(self.gpu_type): float(self.num_gpus)}


@dataclass(frozen=True)
class NodeType(Node):
    min_nodes: int = 0
    max_nodes: int = 1


@dataclass(frozen=True)
class ClusterSpec:
    head: HeadSpec
    nodes: tuple[Node, ...]
    node_types: tuple[NodeType, ...] = ()

    def total_memory_gb(self) -> float:
        """Ray memory of the head, the nodes and every node the autoscaler may add."""
        return (self.head.memory_gb + sum(n.memory_gb for n in self.nodes)
                + sum(t.memory_gb * t.max_nodes for t in self.node_types))


# --------------------------------------------------------------------------------------------------------------
# Service spec
# --------------------------------------------------------------------------------------------------------------


class ModelSpec(_Strict):
    id: str = Field("tiny-llama", min_length=1, description="model name clients send in `model`")
    source: str = Field(
        "tiny",
        description="'tiny' = the generated tiny Llama (built on first use); otherwise a local path or hub id",
    )


class EngineSpec(_Strict):
    """vLLM engine options that differ between the CPU stack and GPU clusters. Nothing else branches on device."""

    device: Literal["cpu", "cuda"] = "cpu"
    kv_connector: str = "NixlConnector"
    kv_buffer_device: Literal["cpu", "cuda"] = "cpu"
    nixl_backends: tuple[str, ...] = ("UCX",)
    nixl_side_channel_port_base: int = Field(20000, ge=1024, le=60000)
    nixl_side_channel_host: str | None = Field(
        None, description="host NIXL handshakes use; None = the Ray node's IP (set 127.0.0.1 on one machine)"
    )
    dtype: str = "bfloat16"
    max_model_len: int = Field(4096, ge=16)
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(1, ge=1)
    cpu_kvcache_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE; ignored on cuda")
    stream_batching_interval_ms: float | None = Field(
        None, ge=0, description="ray.llm batches streamed chunks in windows of this length (None = ray's 50 ms)"
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine kwargs")
    env: dict[str, str] = Field(default_factory=dict, description="extra env vars for every engine process")
    prefill_attempts: int = Field(
        3, ge=1, le=10, description="tries of one request's remote prefill: a prefill replica that dies before its "
        "KV reached the decode engine costs one try, the next goes to another replica of the DG")
    prefill_probe_interval_s: float = Field(
        0.5, gt=0, le=30, description="while decode waits for a prefill's KV, it checks this often that the "
        "prefill replica still lives (a dead one: the decode request is aborted, its KV freed, the prefill retried)")


class RoleSpec(_Strict):
    gpu_types: tuple[str, ...] = Field(min_length=1, description="preferred GPU type first, then fallbacks")
    gpus_per_replica: int = Field(1, ge=1)
    num_cpus_per_replica: float = Field(0.5, gt=0, description="Ray logical CPUs reserved per replica")
    cpu_threads_bind: str | None = Field(
        None, description="VLLM_CPU_OMP_THREADS_BIND for this role's engines (CPU only), e.g. '0' or '0-1'"
    )
    max_ongoing_requests: int = Field(64, ge=1)


class RolesSpec(_Strict):
    prefill: RoleSpec
    decode: RoleSpec


class DeploymentGroupSpec(_Strict):
    """YAML form of a deployment group; `parse_service_spec` turns it into a `DeploymentGroup`."""

    name: str
    domain: str = Field(description="network domain the group lives in: an S1 or S2 name, per `affinity`")
    prefill_replicas: int = Field(1, ge=1, le=1000, description="a DG serves only as a P+D pair: at least one each")
    decode_replicas: int = Field(1, ge=1, le=1000)

    @field_validator("name")
    @classmethod
    def _n(cls, value: str) -> str:
        return _check_name("deployment group name", value)


class IngressSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", description="where the service's OpenAI API is mounted on Serve's HTTP port "
                              "(services sharing one cluster, a fleet, need distinct prefixes: /chat, /batch)")
    request_timeout_s: float = Field(120.0, gt=0, description="whole non-streaming request; first token when streaming")
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="longest gap between streamed chunks")
    api_key_env: str | None = Field(
        "HETEROSCALE_API_KEY", description="env var holding the API key; requests need it when the var is set"
    )
    api_key: str | None = Field(None, description="API key given directly (prefer api_key_env)")
    max_inflight_per_decode_replica: int | None = Field(
        64, ge=1, le=100_000, description="admission control: a DG takes at most this many requests in flight per "
        "routable decode replica; beyond every DG's bound the ingress answers 429 with Retry-After (None = no "
        "bound). Default = the decode role's default max_ongoing_requests; lower it to what keeps the SLOs")
    retry_after_s: float = Field(1.0, gt=0, le=3600, description="the Retry-After a shed request is given")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v != "/" and not re.fullmatch(r"/[a-z0-9][a-z0-9-]{0,40}", v):
            raise ValueError(f"route_prefix ({v!r}) must be '/' or '/<name>' (lowercase letters, digits, '-')")
        return v

    def base_url(self) -> str:
        """The service's base URL (clients append /v1/...)."""
        return f"http://{self.host}:{self.port}{'' if self.route_prefix == '/' else self.route_prefix}"


class ScheduleWindowSpec(_Strict):
    start_s: float = Field(ge=0, le=86_400, description="window start, seconds after midnight (UTC)")
    end_s: float = Field(gt=0, le=86_400)
    total_instances: int = Field(ge=2, description="prefill + decode instances in the window")
    prefill_per_decode: float = Field(gt=0)


class SupplyNodeTypeSpec(_Strict):
    """A node type the cluster autoscaler can add, as the controller must know it to ask for it (Ray's autoscaler
    does not publish node labels): the same GPU type, GPU count and domains as the cluster's node type or
    KubeRay worker group."""

    gpu_type: str
    num_gpus: int = Field(ge=1)
    s1: str
    s2: str
    max_nodes: int = Field(ge=1, description="nodes with these labels the cluster may hold at most")

    _gpu = field_validator("gpu_type")(NodeSpec._gpu.__func__)
    _names = field_validator("s1", "s2")(NodeSpec._names.__func__)


class NodeSupplySpec(_Strict):
    """When a scale-out fits nowhere, ask Ray's cluster autoscaler (v2) for the service's whole target shape."""

    node_types: list[SupplyNodeTypeSpec] = Field(min_length=1)


class AutoscalingSpec(_Strict):
    """The service's controller. Units in the names; defaults suit the local CPU cluster (seconds-scale loops)."""

    enabled: bool = Field(True, description="start the controller with the service (`heteroscale deploy`)")
    advisory: bool = Field(False, description="run the whole loop, log and export decisions, actuate nothing")
    mode: Literal["metrics", "periodic", "metrics_with_schedule_floor"] = "metrics"
    schedule: list[ScheduleWindowSpec] = Field(default_factory=list)
    control_period_s: float = Field(5.0, gt=0, le=600, description="one observe -> decide -> act tick")
    target_decode_tps_per_instance: float = Field(
        gt=0, description="decode tokens/s one decode replica should carry (from a stress test at the SLOs)")
    prefill_per_decode: float = Field(D["prefill_per_decode"], gt=0, description="P:D ratio that meets the SLOs (stress test)")
    target_prefill_tps_per_instance: float | None = Field(
        None, gt=0, description="KV-miss prompt tokens/s one prefill replica carries within the TTFT SLO (stress "
        "test); set: the P:D ratio adapts to the workload, prefill sized from its own demand; None: fixed ratio")
    ratio_range: float = Field(D["ratio_range"], ge=1, description="the adaptive ratio stays within "
                               "[prefill_per_decode / this, prefill_per_decode x this]")
    ratio_window_s: float = Field(D["ratio_window_s"], ge=0, description="a falling ratio estimate follows the "
                                  "workload with this time constant (a rising one at once)")
    ratio_hysteresis: float = Field(D["ratio_hysteresis"], ge=0, lt=1, description="the ratio in force moves when "
                                    "the estimate leaves +/- this share of it")
    forecast_period_s: float | None = Field(
        None, gt=0, description="the period the load repeats over (86400: a day): the controller learns its "
        "profile and scales out one measured start-up ahead of a ramp seen in an earlier period; None: reactive")
    forecast_bin_s: float = Field(D["forecast_bin_s"], gt=0, description="the forecast profile's bin width")
    burst_queue_per_decode: float | None = Field(
        None, gt=0, description="requests queued at the engines (and shed) per ready decode replica past which "
        "the controller acts at once: withdrawn replicas back first, else a step out; None: off")
    ttft_slo_s: float | None = Field(None, gt=0, description="TTFT SLO as users see it (at the ingress)")
    tbt_slo_s: float | None = Field(None, gt=0, description="time-between-tokens SLO")
    slo_quantile: float = Field(0.9, gt=0, lt=1, description="the percentile the SLOs are stated at")
    min_prefill: int = Field(D["min_prefill"], ge=1)
    max_prefill: int = Field(D["max_prefill"], ge=1)
    min_decode: int = Field(D["min_decode"], ge=1)
    max_decode: int = Field(D["max_decode"], ge=1)
    hysteresis_band: float = Field(D["hysteresis_band"], ge=0, lt=1)
    scale_out_cooldown_s: float = Field(D["scale_out_cooldown_s"], ge=0)
    scale_in_cooldown_s: float = Field(D["scale_in_cooldown_s"], ge=0)
    latency_cooldown_s: float = Field(D["latency_cooldown_s"], ge=0)
    max_step_fraction: float = Field(D["max_step_fraction"], gt=0)
    soft_scale_in_window_s: float = Field(D["soft_scale_in_window_s"], ge=0, description="observe SLOs this long before terminating")
    signal_window_s: float = Field(20.0, gt=0, description="look-back of rates and percentiles")
    staleness_limit_s: float = Field(D["staleness_limit_s"], gt=0, description="older signals count as missing: hold")
    report_interval_s: float = Field(1.0, gt=0, le=60, description="replicas and ingress report this often")
    ready_ratio_tolerance_instances: int = Field(D["ready_ratio_tolerance_instances"], ge=0)
    ready_ratio_tolerance_fraction: float = Field(D["ready_ratio_tolerance_fraction"], ge=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, gt=0, description="drain time of a terminated replica; None = the ingress request timeout + 10 s")
    decision_log: str | None = Field(None, description="JSONL path on the controller's node; None = none")
    decision_log_max_mb: float = Field(64.0, gt=0, description="past this size the log rotates to <path>.1 "
                                       "(the previous .1 is dropped): at most twice this on disk")
    probe_timeout_s: float = Field(10.0, gt=0, description="all-or-nothing probe of a new batch")
    serve_call_timeout_s: float = Field(
        30.0, gt=0, description="a call to Serve's controller (replica details, a target); past it the tick fails "
        "and the next one retries, never a frozen loop")
    deploy_timeout_s: float = Field(300.0, gt=0, description="building and submitting a new DG's application")
    pending_timeout_s: float = Field(
        900.0, gt=0, description="a replica not Ready for longer (unplaceable, stuck recovering) is stuck, not "
        "starting: it is cancelled and its capacity placed again where there is room")
    signal_source: Literal["push", "prometheus"] = Field(
        "push", description="push: replicas and the ingress report to the controller; prometheus: PromQL")
    prometheus_url: str | None = Field(None, description="the Prometheus server for signal_source: prometheus")
    node_supply: NodeSupplySpec | None = Field(
        None, description="ask the cluster autoscaler for nodes when a scale-out fits nowhere; None = never")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.max_prefill < self.min_prefill:
            raise ValueError(f"max_prefill ({self.max_prefill}) must be >= min_prefill ({self.min_prefill})")
        if self.max_decode < self.min_decode:
            raise ValueError(f"max_decode ({self.max_decode}) must be >= min_decode ({self.min_decode})")
        if self.mode != "metrics" and not self.schedule:
            raise ValueError(f"mode {self.mode!r} needs a non-empty schedule")
        if self.signal_source == "prometheus" and not self.prometheus_url:
            raise ValueError("signal_source 'prometheus' needs prometheus_url (e.g. http://127.0.0.1:9390)")
        if self.staleness_limit_s < self.report_interval_s:
            raise ValueError(f"staleness_limit_s ({self.staleness_limit_s}) must be >= report_interval_s "
                             f"({self.report_interval_s}), or every signal is stale")
        return self


class ServiceSpecModel(_Strict):
    name: str
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    roles: RolesSpec
    affinity: Literal["s1", "s2", "cluster"] = "s1"
    deployment_groups: list[DeploymentGroupSpec] = Field(min_length=1)
    ingress: IngressSpec = IngressSpec()
    autoscaling: AutoscalingSpec | None = Field(None, description="the controller; None = fixed replica counts")

    @field_validator("name")
    @classmethod
    def _n(cls, value: str) -> str:
        return _check_name("service name", value)

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceSpecModel":
        names = [g.name for g in self.deployment_groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment group names must be unique; repeated: {dupes}")
        drain = self.autoscaling.graceful_shutdown_timeout_s if self.autoscaling else None
        if drain is not None and drain < self.ingress.request_timeout_s:
            raise ValueError(f"autoscaling.graceful_shutdown_timeout_s ({drain}) must be >= "
                             f"ingress.request_timeout_s ({self.ingress.request_timeout_s}): a terminated replica "
                             "must be able to finish every request it holds")
        return self


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    model: ModelSpec
    engine: EngineSpec
    roles: RolesSpec
    affinity: str
    deployment_groups: tuple[DeploymentGroup, ...]  # GPU types unresolved (None) until deploy
    ingress: IngressSpec
    autoscaling: AutoscalingSpec | None = None
    source_path: str | None = field(default=None, compare=False)

    def drain_timeout_s(self) -> float:
        """How long Serve lets a terminated replica finish what it holds: longer than any request may take."""
        if self.autoscaling and self.autoscaling.graceful_shutdown_timeout_s is not None:
            return self.autoscaling.graceful_shutdown_timeout_s
        return self.ingress.request_timeout_s + self.ingress.stream_idle_timeout_s + 10.0

    def api_key(self) -> str | None:
        if self.ingress.api_key:
            return self.ingress.api_key
        if self.ingress.api_key_env:
            return os.environ.get(self.ingress.api_key_env) or None
        return None


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        bad = e.get("input")
        shown = "" if isinstance(bad, (dict, list)) else f" (got {bad!r})"
        lines.append(f"  {path}: {e['msg']}{shown}")
    return "\n".join(lines)


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_cluster_spec(data: dict, source: str = "<dict>") -> ClusterSpec:
    try:
        model = ClusterSpecModel.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    nodes = tuple(Node(**n.model_dump()) for n in model.nodes)
    return ClusterSpec(head=model.head, nodes=nodes, node_types=tuple(NodeType(**t.model_dump()) for t in model.node_types))


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    return parse_cluster_spec(_read_yaml(path), str(path))


def parse_service_spec(data: dict, source: str = "<dict>") -> ServiceSpec:
    try:
        model = ServiceSpecModel.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    return ServiceSpec(
        name=model.name,
        model=model.model,
        engine=model.engine,
        roles=model.roles,
        affinity=model.affinity,
        deployment_groups=tuple(DeploymentGroup(g.name, model.name, model.affinity, g.domain, None, None,
                                                g.prefill_replicas, g.decode_replicas)
                                for g in model.deployment_groups),
        ingress=model.ingress,
        autoscaling=model.autoscaling,
        source_path=None if source == "<dict>" else source,
    )


def load_service_spec(path: str | Path) -> ServiceSpec:
    return parse_service_spec(_read_yaml(path), str(path))


class FleetServiceSpec(_Strict):
    spec: str = Field(description="the service's spec file (relative to the fleet file)")
    priority: int = Field(0, ge=-1000, le=1000, description="higher keeps its capacity first")
    min_decode: int | None = Field(None, ge=0, description="decode replicas arbitration always leaves the service "
                                   "(prefill from its ratio); 0: best effort, it may be scaled to zero. "
                                   "Default: its autoscaling.min_decode")


class FleetSpecModel(_Strict):
    name: str
    control_period_s: float = Field(5.0, gt=0, le=3600)
    gpu_budget: int | None = Field(None, ge=0, description="GPUs all the fleet's services may hold together")
    gpu_budget_by_type: dict[str, int] = Field(default_factory=dict, description="GPUs per type the fleet may hold")
    preempt_drain_s: float = Field(0.0, ge=0, description="a preempted group stays withdrawn at least this long "
                                   "before it is removed (one control period at least)")
    services: list[FleetServiceSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("fleet", v)

    @field_validator("gpu_budget_by_type")
    @classmethod
    def _types(cls, v: dict[str, int]) -> dict[str, int]:
        for gpu_type, cap in v.items():
            if not _GPU_TYPE.match(gpu_type) or cap < 0:
                raise ValueError(f"gpu_budget_by_type[{gpu_type!r}] ({cap}) needs a GPU type name and a count >= 0")
        return v


@dataclass(frozen=True)
class FleetMember:
    spec: ServiceSpec
    priority: int = 0
    min_decode: int | None = None


@dataclass(frozen=True)
class FleetSpec:
    """Services one fleet controller scales together over one cluster (`autoscaler.fleet_controller`)."""

    name: str
    members: tuple[FleetMember, ...]
    control_period_s: float = 5.0
    gpu_budget: int | None = None
    gpu_budget_by_type: dict[str, int] = field(default_factory=dict)
    preempt_drain_s: float = 0.0
    source_path: str | None = field(default=None, compare=False)

    def member(self, service: str) -> FleetMember:
        for m in self.members:
            if m.spec.name == service:
                return m
        raise KeyError(f"fleet {self.name!r} has no service {service!r} (has {[m.spec.name for m in self.members]})")


def parse_fleet_spec(data: dict, base: Path, source: str = "<dict>") -> FleetSpec:
    """A fleet from its parsed YAML; service spec paths are relative to `base`. Every service needs an enabled
    `autoscaling` section, its own route prefix, and the one HTTP host and port the cluster's Serve listens on."""
    try:
        model = FleetSpecModel.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    members = []
    for i, entry in enumerate(model.services):
        where = f"{source}: services[{i}]"
        spec = load_service_spec(base / entry.spec)
        a = spec.autoscaling
        if a is None or not a.enabled:
            raise ConfigError(f"{where}: service {spec.name!r} has no enabled autoscaling section; a fleet scales "
                              "every service it holds")
        if entry.min_decode is not None and entry.min_decode > a.min_decode:
            raise ConfigError(f"{where}: min_decode ({entry.min_decode}) must be <= the service's "
                              f"autoscaling.min_decode ({a.min_decode})")
        members.append(FleetMember(spec, entry.priority, entry.min_decode))
    for what, key in (("name", lambda m: m.spec.name), ("ingress.route_prefix", lambda m: m.spec.ingress.route_prefix)):
        seen: dict[str, str] = {}
        for m in members:
            if key(m) in seen:
                raise ConfigError(f"{source}: services {seen[key(m)]!r} and {m.spec.name!r} share the {what} "
                                  f"{key(m)!r}; each service of a fleet needs its own")
            seen[key(m)] = m.spec.name
    ports = sorted((m.spec.engine.nixl_side_channel_port_base, _nixl_port_end(m.spec), m.spec.name) for m in members)
    for (lo_a, hi_a, a), (lo_b, _, b) in zip(ports, ports[1:]):
        if lo_b < hi_a:  # every group's engines listen on base + 200 x slot + ...: one machine, one port each
            raise ConfigError(f"{source}: services {a!r} and {b!r} share NIXL side-channel ports ({a} uses "
                              f"{lo_a}-{hi_a - 1} for up to {(hi_a - lo_a) // 200} groups, {b} starts at {lo_b}); "
                              f"give {b!r} an engine.nixl_side_channel_port_base of at least {hi_a}")
    endpoints = {(m.spec.ingress.host, m.spec.ingress.port) for m in members}
    if len(endpoints) > 1:
        raise ConfigError(f"{source}: the services listen on {sorted(endpoints)}; one cluster's Serve has one HTTP "
                          "host and port, so a fleet's services share them (and differ by route_prefix)")
    return FleetSpec(model.name, tuple(members), model.control_period_s, model.gpu_budget,
                     dict(model.gpu_budget_by_type), model.preempt_drain_s,
                     None if source == "<dict>" else source)


def _nixl_port_end(spec: ServiceSpec) -> int:
    """One past the last NIXL side-channel port the service's groups may use: 200 per group slot, as many slots
    as groups it can hold (each holds a decode replica at least)."""
    most = max(spec.autoscaling.max_decode if spec.autoscaling else 0, len(spec.deployment_groups), 1)
    return spec.engine.nixl_side_channel_port_base + 200 * most


def load_fleet_spec(path: str | Path) -> FleetSpec:
    return parse_fleet_spec(_read_yaml(path), Path(path).parent, str(path))


def check_service_fits_cluster(service: ServiceSpec, cluster: ClusterSpec) -> None:
    """Static check: each DG's domain exists and holds an accepted GPU type for both roles. Raises ConfigError."""
    label = {"s1": "s1", "s2": "s2"}.get(service.affinity)
    everything = [*cluster.nodes, *cluster.node_types]  # a DG may sit where only the autoscaler adds nodes
    for group in service.deployment_groups:
        in_domain = [n for n in everything if label is None or getattr(n, label) == group.domain]
        if label is not None and not in_domain:
            known = sorted({getattr(n, label) for n in everything})
            raise ConfigError(
                f"deployment group {group.name!r}: domain {group.domain!r} is not a known {label.upper()} domain "
                f"(known: {known})"
            )
        for role_name in ("prefill", "decode"):
            role = getattr(service.roles, role_name)
            types_here = {n.gpu_type for n in in_domain}
            if not types_here & set(role.gpu_types):
                raise ConfigError(
                    f"deployment group {group.name!r}: domain {group.domain!r} has no node with a {role_name} "
                    f"GPU type {list(role.gpu_types)} (it has {sorted(types_here)})"
                )
    supply = service.autoscaling.node_supply if service.autoscaling else None
    for i, wanted in enumerate(supply.node_types if supply else ()):
        field_path = f"autoscaling.node_supply.node_types.{i}"
        match = [t for t in cluster.node_types
                 if (t.gpu_type, t.num_gpus, t.s1, t.s2) == (wanted.gpu_type, wanted.num_gpus, wanted.s1, wanted.s2)]
        if not match:
            have = [f"{t.name}: {t.num_gpus}x {t.gpu_type} in {t.s1}/{t.s2}" for t in cluster.node_types]
            raise ConfigError(f"{field_path}: no node type of the cluster has {wanted.num_gpus}x {wanted.gpu_type} in "
                              f"{wanted.s1}/{wanted.s2} (node_types: {have or 'none'})")
        static = sum(1 for n in cluster.nodes if (n.gpu_type, n.num_gpus, n.s1, n.s2) ==
                     (wanted.gpu_type, wanted.num_gpus, wanted.s1, wanted.s2))
        most = static + sum(t.max_nodes for t in match)
        if wanted.max_nodes > most:
            raise ConfigError(f"{field_path}: max_nodes ({wanted.max_nodes}) is more than the cluster can hold with "
                              f"these labels ({most}: {static} started nodes + the node types' max_nodes)")
