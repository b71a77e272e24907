"""Start, find and stop a service's controller actor (one named, detached actor per service in the
controller namespace) and a fleet's controller (`start_fleet`: one more actor over the fleet's services). `autoscaler.controller` is the actor and its loop; this module is how the wiring layer
(`heteroscale_ray.service`), the CLI and the tests reach it."""

from __future__ import annotations

import time

from autoscaler import persistence
from autoscaler.controller import HeteroScaleController
from autoscaler.orphans import group_key
from autoscaler.serve_client import RayKV
from common.config import FleetSpec, ServiceSpec
from common.vocab import CONTROLLER_NAMESPACE, DeploymentGroup, controller_name


def start(spec: ServiceSpec, model_path: str, groups: list[tuple[DeploymentGroup, int]], deployer: str | None = None,
          fleet: str | None = None):
    """Start the service's detached controller actor (its loop starts with it). A controller already running
    for the service (a re-deploy) is replaced so the new spec takes effect; its saved state is kept, so the
    new one resumes where the old one was. `deployer` ("module:function") builds and runs a new DG's
    application; the wiring layer passes it, so this package never imports the serving layer. Returns the
    handle."""
    import ray

    name = controller_name(spec.name)
    _replace(name)
    actor = ray.remote(HeteroScaleController).options(
        name=name, namespace=CONTROLLER_NAMESPACE, lifetime="detached", max_restarts=-1, max_concurrency=64,
        num_cpus=0)
    handle = actor.remote(spec, model_path, groups, deployer=deployer, fleet=fleet)
    ray.get(handle.ping.remote())
    return handle


def _replace(name: str) -> None:
    """Kill a running actor of that name and wait until the name is free (a re-deploy replaces it)."""
    import ray

    try:
        old = ray.get_actor(name, namespace=CONTROLLER_NAMESPACE)
        ray.kill(old, no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the name is free once the old actor is dead
            try:
                ray.get_actor(name, namespace=CONTROLLER_NAMESPACE)
                time.sleep(0.2)
            except ValueError:
                break
    except ValueError:
        pass


def fleet_name(fleet: str) -> str:
    return f"heteroscale-fleet-{fleet}"


def start_fleet(fleet: FleetSpec, model_paths: dict[str, str], groups: dict[str, list[tuple[DeploymentGroup, int]]],
                deployer: str | None = None):
    """Start every service's controller in fleet mode (no loop of its own), then the fleet's controller, which
    decides and places them all in one cycle (`autoscaler.fleet_controller`). Returns the fleet's handle."""
    import ray

    from autoscaler.fleet_controller import FleetController

    members = {m.spec.name: start(m.spec, model_paths[m.spec.name], groups[m.spec.name], deployer, fleet.name)
               for m in fleet.members}
    name = fleet_name(fleet.name)
    _replace(name)
    handle = ray.remote(FleetController).options(
        name=name, namespace=CONTROLLER_NAMESPACE, lifetime="detached", max_restarts=-1, max_concurrency=8,
        num_cpus=0).remote(fleet, members)
    ray.get(handle.ping.remote())
    return handle


def find_fleet(fleet: str):
    import ray

    return ray.get_actor(fleet_name(fleet), namespace=CONTROLLER_NAMESPACE)


def stop_fleet(fleet: FleetSpec) -> bool:
    """Kill the fleet's controller for good (forgetting its state), then every service's. Returns whether the
    fleet's controller was running."""
    import ray

    from autoscaler.fleet_controller import fleet_state_key

    try:
        ray.kill(find_fleet(fleet.name), no_restart=True)
        found = True
    except ValueError:
        found = False
    RayKV().delete(fleet_state_key(fleet.name))
    for m in fleet.members:
        stop(m.spec.name)
    return found


def find(service: str):
    import ray

    return ray.get_actor(controller_name(service), namespace=CONTROLLER_NAMESPACE)


def stop(service: str) -> bool:
    """Kill the controller for good and forget its saved state. Returns whether one was running."""
    import ray

    try:
        ray.kill(find(service), no_restart=True)
        found = True
    except ValueError:
        found = False
    kv = RayKV()
    kv.delete(persistence.state_key(service))
    for key in kv.keys(group_key(service, "")):  # the created groups' own records (autoscaler.orphans)
        kv.delete(key)
    from placement.ray_adapter import withdraw_supply

    withdraw_supply(service)  # its part of the cluster autoscaler's request, if it asked for nodes
    return found
