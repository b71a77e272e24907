"""Deploy, inspect and remove a P/D service on a Ray cluster (local labelled cluster or `RAY_ADDRESS`).

Reads node facts (labels, fake-GPU resources) from the live cluster, checks the service fits, builds the Serve
application (`serving.app`) and waits until it is RUNNING, printing progress. Ray and the serving package are
imported inside the functions so that `heteroscale --help` and config validation stay fast.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from common.config import ServiceSpec
from heteroscale_ray.tiny_model import ensure_tiny_model

logger = logging.getLogger(__name__)


def connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or "auto", logging_level="WARNING", log_to_driver=False,
             namespace="heteroscale")
    # ray.llm logs every deployment's full options at INFO (as JSON); keep the console to our progress lines.
    for name in ("ray.llm", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def import_build_app():
    """Import `serving.app.build_app` (vLLM via ray.llm) without letting ray.llm take over driver logging.

    On import ray.llm puts a JSON handler at INFO on the root logger, and its builders log every deployment's
    full options at INFO on handlers of their own; the CLI's console should show our progress lines only.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from serving.app import build_app

    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.serve.ray.llm"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return build_app


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def model_path(service: ServiceSpec) -> str:
    return str(ensure_tiny_model()) if service.model.source == "tiny" else service.model.source


def deploy(service: ServiceSpec, address: str | None = None, *, timeout_s: float = 600.0,
           progress: Callable[[str], None] = print) -> str:
    """Deploy (or update) the service and wait until RUNNING. Returns the base URL of the ingress."""
    from ray import serve

    connect(address)
    path = model_path(service)
    build_app = import_build_app()
    from placement.ray_adapter import live_nodes

    app = build_app(service, path, live_nodes())
    serve.start(http_options={"host": service.ingress.host, "port": service.ingress.port},
                proxy_location="HeadOnly")
    progress(f"deploying {service.name}: {len(service.deployment_groups)} deployment group(s), model {path}")
    serve.run(app, name=service.name, route_prefix="/", blocking=False)
    wait_running(service.name, timeout_s=timeout_s, progress=progress)
    url = f"http://{service.ingress.host}:{service.ingress.port}"
    progress(f"{service.name} is RUNNING at {url}/v1")
    return url


def wait_running(app_name: str, *, timeout_s: float, progress: Callable[[str], None] = print) -> None:
    from ray import serve

    start = time.monotonic()
    last = ""
    while True:
        status = serve.status().applications.get(app_name)
        state = str(getattr(status.status, "value", status.status)) if status else "NOT_STARTED"
        if status is not None:
            detail = ", ".join(f"{name}={getattr(d.status, 'value', d.status)}"
                               for name, d in sorted(status.deployments.items()))
            line = f"  [{time.monotonic() - start:5.0f}s] {state}: {detail}"
            if line.split(":", 1)[1] != last:
                progress(line)
                last = line.split(":", 1)[1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            message = status.message if status else ""
            raise RuntimeError(f"application {app_name!r} is {state}: {message}")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f}s (state {state})")
        time.sleep(2.0)


def engine_handles(service: ServiceSpec):
    """(group, role, deployment handle) of every engine deployment of the service."""
    from ray import serve

    from common.vocab import Role
    from serving.deployment_groups import deployment_name

    for group in service.deployment_groups:
        for role in Role:
            yield group.name, role, serve.get_deployment_handle(deployment_name(service.name, group.name, role),
                                                                service.name)


def placements(service: ServiceSpec) -> list[dict]:
    """Where every engine replica runs (node labels), per deployment group and role."""
    return [handle.placement.remote().result(timeout_s=30) for _, _, handle in engine_handles(service)]


def undeploy(service_name: str, address: str | None = None) -> None:
    from ray import serve

    connect(address)
    serve.delete(service_name)
