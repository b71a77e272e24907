"""The Serve calls the live world makes, and Serve's instance details read as per-role replica states: the
Serve client behind `autoscaler.ray_world.RayWorld` (tests put a fake with the same methods in its place).
Imports Ray only inside its methods, so the controller's module imports stay light."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from common.config import ServiceSpec
from common.vocab import CONTROLLER_NAMESPACE, DeploymentGroup, NodeInfo, Role, deployment_name, group_app_name
from placement.scheduler import ServiceShape

_HOLDING = {"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION"}  # replica states holding GPUs


@dataclass(frozen=True)
class RoleState:
    target: int
    running: frozenset[str]
    holding: int  # replicas that hold their resources (placed)


class ServeClient(Protocol):
    """What the live world needs of Serve and the cluster (`LiveServe`; `tests.fakes.FakeServe` in tests)."""

    def details(self) -> dict: ...
    def set_target(self, app: str, deployment: str, num_replicas: int) -> None: ...
    def delete_app(self, app: str) -> None: ...
    def deploy_group(self, spec: ServiceSpec, group: DeploymentGroup, slot: int, model_path: str) -> None: ...
    def nodes(self) -> list[NodeInfo]: ...
    def realize(self, action, shape: ServiceShape, scale: Callable, timeout_s: float) -> bool: ...
    def sweep_probes(self, service: str) -> int: ...
    def request_nodes(self, service: str, bundles: list[dict], selectors: list[dict]) -> None: ...


class KV(Protocol):
    """A byte key-value store that outlives the controller (Ray's internal KV; `tests.fakes.FakeKV`)."""

    def get(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...


class LiveServe:
    """The Serve calls the live world makes (an adapter; tests use a fake with the same methods). Every call
    that waits on Ray is bounded: `call_timeout_s` for Serve's controller, `deploy_timeout_s` for building a
    new DG's application (ray.exceptions.GetTimeoutError past it: the tick fails or the action is returned as
    not done, and the next tick retries)."""

    def __init__(self, call_timeout_s: float = 30.0, deploy_timeout_s: float = 300.0, deployer: str | None = None):
        self.call_timeout_s, self.deploy_timeout_s = call_timeout_s, deploy_timeout_s
        self.deployer = deployer  # "module:function" that builds and runs a DG's application (the wiring layer's)

    def details(self) -> dict:
        import ray
        from ray.serve.context import _get_global_client

        # ServeControllerClient.get_serve_details() waits without a bound; the same call, bounded
        controller = _get_global_client()._controller
        return ray.get(controller.get_serve_instance_details.remote(), timeout=self.call_timeout_s)

    def set_target(self, app: str, deployment: str, num_replicas: int) -> None:
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=deployment, app_name=app),
                                                             num_replicas), timeout=self.call_timeout_s)

    def delete_app(self, app: str) -> None:
        from ray import serve

        serve.delete(app, _blocking=False)

    def deploy_group(self, spec: ServiceSpec, group: DeploymentGroup, slot: int, model_path: str) -> None:
        """Build and deploy the DG's application in a one-shot worker (vLLM is imported there, not here)."""
        import ray

        if self.deployer is None:
            raise RuntimeError("this controller was started without a DG deployer: it cannot create groups")
        task = ray.remote(num_cpus=0, max_calls=1)(_run_deployer)
        ray.get(task.remote(self.deployer, spec, group, slot, model_path), timeout=self.deploy_timeout_s)

    def nodes(self) -> list[NodeInfo]:
        from placement.ray_adapter import live_nodes

        return live_nodes()

    def realize(self, action, shape: ServiceShape, scale: Callable, timeout_s: float) -> bool:
        from placement.ray_adapter import realize

        return realize(action, shape, scale, timeout_s=timeout_s)

    def sweep_probes(self, service: str) -> int:
        from placement.ray_adapter import sweep_probes

        return sweep_probes(service)

    def request_nodes(self, service: str, bundles: list[dict], selectors: list[dict]) -> None:
        from placement.ray_adapter import request_supply

        request_supply(service, bundles, selectors)


def _run_deployer(deployer: str, spec: ServiceSpec, group: DeploymentGroup, slot: int, model_path: str):
    """The one-shot task's body: import the wiring layer's deployer by its path and call it."""
    import importlib

    module, _, name = deployer.partition(":")
    return getattr(importlib.import_module(module), name)(spec, group, slot, model_path)


def role_states(details: dict, service: str, group: str) -> dict[Role, RoleState] | None:
    """Targets and replicas of one DG's deployments from Serve's instance details (None: no such app)."""
    app = (details.get("applications") or {}).get(group_app_name(service, group))
    if app is None:
        return None
    out = {}
    for role in Role:
        dep = (app.get("deployments") or {}).get(deployment_name(service, group, role)) or {}
        replicas = dep.get("replicas") or []
        state = lambda r: str(r.get("state", "")).split(".")[-1]  # noqa: E731 (enum or its name)
        out[role] = RoleState(int(dep.get("target_num_replicas", 0) or 0),
                              frozenset(r["replica_id"] for r in replicas if state(r) == "RUNNING"),
                              sum(1 for r in replicas if state(r) in _HOLDING))
    return out


class RayKV:
    """Ray's internal KV (in the GCS: survives the controller actor, not the cluster)."""

    def get(self, key: bytes) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=CONTROLLER_NAMESPACE)

    def put(self, key: bytes, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=CONTROLLER_NAMESPACE)

    def delete(self, key: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key, namespace=CONTROLLER_NAMESPACE)

    def keys(self, prefix: bytes) -> list[bytes]:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_list(prefix, namespace=CONTROLLER_NAMESPACE)
