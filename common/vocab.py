"""The project's shared vocabulary: node label keys, resource names, roles, domain scopes, node facts and the
deployment-group type, used from config to scheduler to router. A leaf: imports nothing of the project, no Ray,
vLLM, clock or environment, so every package may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

#: Node label keys. A deployment group is pinned to a domain and GPU type by these labels.
LABEL_GPU_TYPE = "heteroscale.io/gpu-type"
LABEL_S1 = "heteroscale.io/s1"
LABEL_S2 = "heteroscale.io/s2"
LABEL_NODE = "heteroscale.io/node"  # the node's name from the cluster spec, for humans and `heteroscale status`


def gpu_resource(gpu_type: str) -> str:
    """Ray custom resource that stands in for one accelerator of `gpu_type` (e.g. `GPU_H20`)."""
    return f"GPU_{gpu_type}"


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Scope:
    """Domain scopes (plain strings, as in the service spec's `affinity`)."""

    S1 = "s1"
    S2 = "s2"
    CLUSTER = "cluster"


SCOPES = (Scope.S1, Scope.S2, Scope.CLUSTER)
CLUSTER_DOMAIN = "*"  # the one domain at cluster scope
_SCOPE_LABEL = {Scope.S1: LABEL_S1, Scope.S2: LABEL_S2, Scope.CLUSTER: None}


def domain_label(scope: str) -> str | None:
    """Node label key that names a domain at this scope (None at cluster scope: every node is in it)."""
    try:
        return _SCOPE_LABEL[scope]
    except KeyError:
        raise ValueError(f"scope {scope!r} must be one of {list(SCOPES)}") from None


def label_selector(scope: str, domain: str, gpu_type: str) -> dict[str, str]:
    """The node labels one replica (or placement-group bundle) of a deployment group is pinned with."""
    selector = {LABEL_GPU_TYPE: gpu_type}
    key = domain_label(scope)
    if key is not None:
        selector[key] = domain
    return selector


def pinned_bundles(scope: str, domain: str, parts) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """One placement bundle and its label selector per instance; `parts` are (gpu_type, count, gpus each)."""
    bundles, selectors = [], []
    for gpu_type, count, gpus in parts:
        bundles += [{gpu_resource(gpu_type): float(gpus)} for _ in range(count)]
        selectors += [label_selector(scope, domain, gpu_type) for _ in range(count)]
    return bundles, selectors


@dataclass(frozen=True)
class NodeInfo:
    """What placement and planning know of one accelerator node (from Ray's node table or a generated fleet)."""

    node_id: str
    gpu_type: str
    total_gpus: int
    free_gpus: int
    s1: str
    s2: str

    def __post_init__(self) -> None:
        if not 0 <= self.free_gpus <= self.total_gpus:
            raise ValueError(f"node {self.node_id}: free_gpus ({self.free_gpus}) must be in [0, total_gpus "
                             f"({self.total_gpus})]")

    def domain(self, scope: str) -> str:
        """This node's domain name at `scope`."""
        if scope == Scope.CLUSTER:
            return CLUSTER_DOMAIN
        domain_label(scope)  # validates the scope
        return self.s1 if scope == Scope.S1 else self.s2


@dataclass(frozen=True)
class DeploymentGroup:
    """A deployment group: one prefill and one decode pool pinned to one network domain.

    Counts are targets (instances that should exist, withdrawn ones included). GPU types are None in a service
    spec until deploy resolves them from the domain's nodes (the role's first preferred type present there)."""

    name: str
    service: str
    scope: str
    domain: str
    prefill_gpu_type: str | None
    decode_gpu_type: str | None
    num_prefill: int
    num_decode: int

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 0:
            raise ValueError(f"deployment group {self.name!r}: num_prefill ({self.num_prefill}) and num_decode "
                             f"({self.num_decode}) must be >= 0")

    def gpu_type(self, role: Role) -> str | None:
        return self.prefill_gpu_type if role is Role.PREFILL else self.decode_gpu_type

    def count(self, role: Role) -> int:
        return self.num_prefill if role is Role.PREFILL else self.num_decode

    def selector(self, role: Role) -> dict[str, str]:
        gpu_type = self.gpu_type(role)
        if gpu_type is None:
            raise ValueError(f"deployment group {self.name!r}: the {role.value} GPU type is not resolved yet")
        return label_selector(self.scope, self.domain, gpu_type)


# ---- names of what a service deploys (the controller, the router and the CLI find each other by these) -----------

INGRESS_DEPLOYMENT = "ingress"
CONTROLLER_NAMESPACE = "heteroscale"


def group_app_name(service: str, group: str) -> str:
    """Each DG is its own Serve application, so adding or removing one never redeploys another."""
    return f"{service}--{group}"


def deployment_name(service: str, group: str, role: Role) -> str:
    return f"{service}:{group}:{role.value}"


def controller_name(service: str) -> str:
    return f"heteroscale-controller-{service}"
