"""Deploy, inspect and remove a P/D service on a Ray cluster (local labelled cluster or `RAY_ADDRESS`).

Reads node facts (labels, fake-GPU resources) from the live cluster, checks the service fits, builds the Serve
application (`serving.app`) and waits until it is RUNNING, printing progress. Ray and the serving package are
imported inside the functions so that `heteroscale --help` and config validation stay fast.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from common.config import FleetSpec, ServiceSpec
from common.vocab import DeploymentGroup, Role, controller_name, deployment_name, group_app_name
from heteroscale_ray import console
from heteroscale_ray.tiny_model import ensure_tiny_model

logger = logging.getLogger(__name__)


def _check_gcs(address: str) -> None:
    """Ray retries an unreachable GCS for minutes; a closed port should be one line at once."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # not host:port (e.g. "auto"): let Ray resolve it
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at {address} ({err.strerror or err})") from None


def connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_gcs(address)
    ray.init(address=address or "auto", logging_level="WARNING", log_to_driver=False,
             namespace="heteroscale")
    # ray.llm logs every deployment's full options at INFO (as JSON); keep the console to our progress lines.
    for name in ("ray.llm", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    console.route_library_logs()


def import_serving_app():
    """Import `serving.app` (vLLM via ray.llm) without letting ray.llm take over driver logging.

    On import ray.llm puts a JSON handler at INFO on the root logger, and its builders log every deployment's
    full options at INFO on handlers of their own; the CLI's console should show our progress lines only.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # vLLM's import-time notes about Triton on a CPU-only box would reach the console through ray.llm's handler.
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    from serving import app

    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.serve.ray.llm"):
            logging.getLogger(name).setLevel(logging.WARNING)
    console.route_library_logs()
    return app


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def model_path(service: ServiceSpec) -> str:
    return str(ensure_tiny_model()) if service.model.source == "tiny" else service.model.source


def deploy(service: ServiceSpec, address: str | None = None, *, timeout_s: float = 600.0,
           progress: Callable[[str], None] = print) -> str:
    """Deploy the service (each deployment group its own Serve application, the ingress in front), wait until
    every application is RUNNING, then start the service's controller when its `autoscaling` section enables
    one. Returns the base URL of the ingress."""
    url, groups = deploy_apps(service, address, timeout_s=timeout_s, progress=progress)
    if service.autoscaling is not None and service.autoscaling.enabled:
        start_controller(service, groups, progress=progress)
    return url


def deploy_apps(service: ServiceSpec, address: str | None = None, *, timeout_s: float = 600.0,
                progress: Callable[[str], None] = print) -> tuple[str, list[tuple[DeploymentGroup, int]]]:
    """`deploy` without the controller: (the ingress's base URL, each deployed group with its slot), the
    groups as `start_controller` takes them (`make demo` profiles the fixed service before it starts one)."""
    from ray import serve

    from autoscaler.settings import check
    from placement.ray_adapter import live_nodes

    check(service)  # every autoscaling rule before anything starts (not in the controller, after the DGs)
    connect(address)
    path = model_path(service)
    app = import_serving_app()
    nodes = live_nodes()
    groups = [app.build_group_app(service, group, slot, path, nodes)
              for slot, group in enumerate(service.deployment_groups)]
    serve.start(http_options={"host": service.ingress.host, "port": service.ingress.port},
                proxy_location="HeadOnly")
    progress(f"deploying {service.name}: {len(groups)} deployment group(s), model {path}")
    for built in groups:
        app.run_group_app(service, built)
    serve.run(app.build_ingress_app(service, groups), name=service.name, route_prefix=service.ingress.route_prefix,
              blocking=False)
    for name in [g.app_name for g in groups] + [service.name]:
        wait_running(name, timeout_s=timeout_s, progress=progress)
    url = service.ingress.base_url()
    progress(f"{service.name} is RUNNING at {url}/v1")
    return url, [(g.group, g.slot) for g in groups]


def start_controller(service: ServiceSpec, groups: list[tuple[DeploymentGroup, int]],
                     progress: Callable[[str], None] = print) -> None:
    """Start (or replace) the service's controller over its deployed `groups` (`deploy_apps`)."""
    from autoscaler import lifecycle
    from autoscaler.settings import check

    if service.autoscaling is None or not service.autoscaling.enabled:
        raise ValueError(f"service {service.name!r} has no enabled `autoscaling` section to start a controller for")
    check(service)
    lifecycle.start(service, model_path(service), groups, deployer=DEPLOYER)
    mode = "advisory" if service.autoscaling.advisory else "active"
    progress(f"controller {controller_name(service.name)} started ({mode}, every "
             f"{service.autoscaling.control_period_s:g}s)")


def group_apps(service_name: str) -> list[str]:
    """The Serve applications of the service's deployment groups (those deployed and those the controller added)."""
    from ray import serve

    prefix = group_app_name(service_name, "")
    return sorted(name for name in serve.status().applications if name.startswith(prefix))


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
    """(group, role, deployment handle) of every engine deployment of the service, controller-added DGs included."""
    from ray import serve

    prefix = group_app_name(service.name, "")
    for app_name in group_apps(service.name):
        group = app_name[len(prefix):]
        for role in Role:
            yield group, role, serve.get_deployment_handle(deployment_name(service.name, group, role), app_name)


def deploy_group(spec: ServiceSpec, group: DeploymentGroup, slot: int, model_path: str) -> DeploymentGroup:
    """Build and run one DG's application on the cluster's live nodes: the controller's deployer (it runs in a
    one-shot Ray task, so neither the controller nor the autoscaler package imports the serving layer)."""
    from placement.ray_adapter import live_nodes
    from serving.app import build_group_app, run_group_app

    built = build_group_app(spec, group, slot, model_path, live_nodes())
    run_group_app(spec, built)
    return built.group


DEPLOYER = f"{__name__}:{deploy_group.__name__}"  # what `lifecycle.start` is given


def placements(service: ServiceSpec) -> list[dict]:
    """Where every engine replica runs (node labels), per deployment group and role."""
    return [handle.placement.remote().result(timeout_s=30) for _, _, handle in engine_handles(service)]


def undeploy(service_name: str, address: str | None = None, timeout_s: float = 300.0) -> list[str]:
    """Stop the controller (forgetting its state), then delete the ingress and every DG application, waiting up
    to `timeout_s` for all of them to be gone (Serve's own blocking delete gives up after 60 s, and a replica
    whose engine is still starting cannot stop before its start-up ends: ~25-55 s each here, longer when
    several start at once)."""
    from ray import serve

    from autoscaler import lifecycle

    connect(address)
    lifecycle.stop(service_name)
    apps = [a for a in [service_name, *group_apps(service_name)] if a in serve.status().applications]
    for name in apps:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while (left := [a for a in apps if a in serve.status().applications]) and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        raise TimeoutError(f"{service_name}: applications {left} were not deleted within {timeout_s:g}s")
    return apps


def status(service: ServiceSpec, address: str | None = None) -> dict:
    """What `heteroscale status` shows: Serve's view of every DG application plus the controller's own."""
    import ray
    from ray import serve

    from autoscaler import lifecycle

    connect(address)
    apps = serve.status().applications
    report: dict = {"service": service.name, "ingress": str(getattr(apps.get(service.name), "status", "NOT_DEPLOYED")),
                    "applications": {}, "controller": None}
    for name in group_apps(service.name):
        report["applications"][name] = {dep: {"status": str(d.status), "replicas": dict(d.replica_states)}
                                        for dep, d in apps[name].deployments.items()}
    try:
        report["controller"] = ray.get(lifecycle.find(service.name).status.remote(), timeout=30)
    except ValueError:
        report["controller"] = None  # fixed replica counts, or not deployed
    return report


def _forecast_text(f: dict) -> str:
    if f["decode_tps"] is None:
        return f", forecast: none yet ({f['history_bins']} bins of history" + \
            (", no start-up measured)" if f["startup_s"] is None else ")")
    return (f", forecast peak {f['decode_tps']:.0f} decode tokens/s within {f['startup_s']:.0f}s "
            f"(error {100 * (f['error'] or 0):.0f} %)")


def format_status(report: dict) -> str:
    lines = [f"service {report['service']}: ingress {report['ingress']}"]
    ctl = report.get("controller")
    if ctl is None:
        lines.append("  no controller (fixed replica counts)")
        for app, deps in report["applications"].items():
            for dep, d in deps.items():
                lines.append(f"  {dep}: {d['status']} {d['replicas']}")
        return "\n".join(lines)
    mode = "advisory" if ctl["advisory"] else "active"
    lines.append(f"  controller: {mode}, {ctl['ticks']} ticks, every {ctl['control_period_s']:g}s, "
                 f"targets P={ctl['target_prefill']} D={ctl['target_decode']}"
                 + (f", P:D {ctl['prefill_per_decode']:.3g}" if ctl.get("prefill_per_decode") is not None else "")
                 + (f" (adaptive, asked {ctl['ratio_estimate']:.3g})" if ctl.get("adaptive_ratio")
                    and ctl.get("ratio_estimate") is not None else " (adaptive)" if ctl.get("adaptive_ratio") else "")
                 + (_forecast_text(ctl["forecast"]) if ctl.get("forecast") else "")
                 + (f", soft scale-in since {ctl['soft_scale_in']['started_s']:.0f}" if ctl["soft_scale_in"] else "")
                 + (f", errors {ctl['errors']}" if ctl["errors"] else ""))
    counts = lambda c: f"{c['ready']}/{c['withdrawn']}/{c['pending']}/{c.get('stuck', 0)}"  # noqa: E731
    lines.append(f"  {'group':<20} {'domain':<8} {'types (P/D)':<12} {'prefill r/w/p/s':<16} {'decode r/w/p/s':<16} "
                 "target   (ready/withdrawn/pending/stuck)")
    for g in ctl["groups"]:
        lines.append(f"  {g['name']:<20} {g['domain']:<8} {g['prefill_gpu_type']}/{g['decode_gpu_type']:<8} "
                     f"{counts(g['prefill']):<16} {counts(g['decode']):<16} {g['target_prefill']}P {g['target_decode']}D")
    lines.append("  last decisions:")
    for e in ctl["last_decisions"][-5:]:
        acts = ", ".join(f"{a['kind']} {a['group']} -> {a['num_prefill']}P/{a['num_decode']}D"
                         + (f" (withdrawn {a['withdrawn_prefill']}P/{a['withdrawn_decode']}D)"
                            if a["withdrawn_prefill"] or a["withdrawn_decode"] else "") for a in e["actions"])
        tps, ratio = e["observation"]["decode_tps"], e.get("diagnostics", {}).get("prefill_per_decode")
        lines.append(f"    t={e['t']:.0f} {e['action']} ({e['reason']}) decode_tps="
                     f"{'missing' if tps is None else f'{tps:.0f}'} -> P={e['target_prefill']} D={e['target_decode']}"
                     + (f" at P:D {ratio:.3g}" if ratio is not None else "") + (f": {acts}" if acts else ""))
    return "\n".join(lines)


# ---- a fleet: services sharing one cluster under one fleet controller ------------------------------------------


def deploy_fleet(fleet: FleetSpec, address: str | None = None, *, timeout_s: float = 600.0,
                 progress: Callable[[str], None] = print) -> dict[str, str]:
    """Deploy every service of the fleet (its groups and ingress, under its own route prefix), then start
    their controllers in fleet mode and the fleet's controller over them. Returns each service's base URL."""
    from autoscaler import lifecycle
    from autoscaler.settings import check

    for m in fleet.members:
        check(m.spec)
    urls, groups = {}, {}
    for m in fleet.members:
        urls[m.spec.name], groups[m.spec.name] = deploy_apps(m.spec, address, timeout_s=timeout_s, progress=progress)
    lifecycle.start_fleet(fleet, {m.spec.name: model_path(m.spec) for m in fleet.members}, groups, deployer=DEPLOYER)
    progress(f"fleet {fleet.name}: controller {lifecycle.fleet_name(fleet.name)} started over "
             f"{', '.join(f'{m.spec.name} (priority {m.priority})' for m in fleet.members)}, every "
             f"{fleet.control_period_s:g}s")
    return urls


def undeploy_fleet(fleet: FleetSpec, address: str | None = None, timeout_s: float = 300.0) -> list[str]:
    """Stop the fleet's controller, then undeploy every service (`undeploy`)."""
    from autoscaler import lifecycle

    connect(address)
    lifecycle.stop_fleet(fleet)
    return [app for m in fleet.members for app in undeploy(m.spec.name, address, timeout_s)]


def format_fleet_status(report: dict) -> str:
    budget = report.get("budget") or {}
    caps = ", ".join(f"{t} {budget.get('used_by_type', {}).get(t, 0)}/{cap}" for t, cap in
                     sorted((budget.get("by_type") or {}).items())) or "none per type"
    lines = [f"fleet {report['fleet']}: tick {report['ticks']} every {report['control_period_s']:g}s; GPUs used "
             f"{budget.get('used_total', 0)}/{budget.get('total') if budget.get('total') is not None else '-'} "
             f"({caps})"]
    for name, svc in sorted((report.get("services") or {}).items(), key=lambda kv: -kv[1]["priority"]):
        tps = svc["decode_tps"]
        groups = ", ".join(f"{g['name']}@{g['domain']} {g['prefill']}P+{g['decode']}D"
                           + (f" ({g['withdrawn']} withdrawn)" if g["withdrawn"] else "") for g in svc["groups"])
        lines.append(f"  {name} (priority {svc['priority']}, min decode "
                     f"{'-' if svc['min_decode'] is None else svc['min_decode']}): decode "
                     f"{'-' if tps is None else f'{tps:.0f}'} tok/s, target {svc['target_prefill']}P/"
                     f"{svc['target_decode']}D, {svc['action']}/{svc['reason']}; groups: {groups or 'none'}")
    for p in (report.get("preemptions") or [])[-10:]:
        what = f"group {p['group']}" if p["kind"] == "group" else "budget cut"
        lines.append(f"  preempted at {p['t']:.0f}: {p['service']} {what} {p['num_prefill']}P+{p['num_decode']}D "
                     f"for {p['for_service']}")
    if report.get("errors"):
        lines.append(f"  errors: {report['errors']}")
    return "\n".join(lines)


def fleet_status(fleet: str, address: str | None = None) -> dict:
    """What `heteroscale status --fleet` shows: the fleet controller's status (budget used per GPU type, each
    service's priority, demand, targets and groups, every preemption)."""
    import ray

    from autoscaler import lifecycle

    connect(address)
    try:
        return ray.get(lifecycle.find_fleet(fleet).status.remote(), timeout=30)
    except ValueError:
        raise ValueError(f"no fleet controller {lifecycle.fleet_name(fleet)!r} is running") from None
