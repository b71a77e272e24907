"""Ray adapter of the placement core: live topology from Ray's node table, all-or-nothing probes with placement
groups, and the cluster-autoscaler hint. The only module of `placement/` that imports Ray.

Probe protocol for a placed batch (a GROW/CREATE action): one placement group with a bundle per instance,
`bundle_label_selector` pinning each bundle to its role's GPU type and the group's domain, and
`topology_strategy={<domain label>: "STRICT_PACK"}` (all bundles share one domain value). Ray creates a
placement group whole or not at all, so `probe()` returning True proves the batch fits in that domain right
now; on False nothing is left behind. The probe is then removed and the Serve replicas are scaled: a Serve
replica cannot join an outside placement group. In the window between the removal and the replicas' start
another workload can take the capacity; the replicas then stay pending (Serve retries), the next cycle's tree
(rebuilt from live state) no longer shows the capacity, and the controller must treat long-pending replicas
as unplaced (tests/integration/test_placement_ray.py shows the window).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

from common.vocab import (LABEL_GPU_TYPE, LABEL_S1, LABEL_S2, NodeInfo, Role, domain_label, gpu_resource,
                          label_selector, pinned_bundles)
from placement.scheduler import ActionKind, PlacementAction, ServiceShape

logger = logging.getLogger(__name__)


def nodes_from_ray(ray_nodes: Iterable[Mapping], available: Mapping[str, Mapping[str, float]]) -> list[NodeInfo]:
    """NodeInfos from `ray.nodes()` rows and per-node available resources. Nodes without the GPU-type, S1 and S2
    labels (e.g. the head) or without a `GPU_<type>` resource are not part of the accelerator topology."""
    out = []
    for row in ray_nodes:
        if not row.get("Alive"):
            continue
        labels = row.get("Labels") or {}
        gpu_type, s1, s2 = labels.get(LABEL_GPU_TYPE), labels.get(LABEL_S1), labels.get(LABEL_S2)
        if not (gpu_type and s1 and s2):
            continue
        key = gpu_resource(gpu_type)
        total = int(row.get("Resources", {}).get(key, 0))
        if total == 0:
            continue
        free = int(available.get(row["NodeID"], {}).get(key, 0))
        out.append(NodeInfo(row["NodeID"], gpu_type, total, min(max(free, 0), total), s1, s2))
    return out


def live_nodes() -> list[NodeInfo]:
    """The accelerator nodes of the connected Ray cluster with their free GPUs: the one reader of Ray's node
    table (the deploy path, `heteroscale up` and the controller all use it)."""
    import ray
    from ray._private import state  # per-node availability has no public API in 2.60

    return nodes_from_ray(ray.nodes(), state.available_resources_per_node())


def probe_bundles(action: PlacementAction, service: ServiceShape) -> tuple[list[dict], list[dict]]:
    """Bundles and per-bundle label selectors for the instances an action adds."""
    if action.kind not in (ActionKind.GROW, ActionKind.CREATE):
        raise ValueError(f"only GROW/CREATE actions add instances to probe, got {action.kind.value}")
    return pinned_bundles(action.scope, action.domain,
                          ((action.prefill_gpu_type, action.num_prefill, service.gpus_per_prefill),
                           (action.decode_gpu_type, action.num_decode, service.gpus_per_decode)))


PROBE_PREFIX = "heteroscale-probe-"


def sweep_probes(service: str, table: Callable[[], dict] | None = None, remove: Callable | None = None) -> int:
    """Remove the probe placement groups a controller of `service` left (it died between creating one and
    removing it, or its node went away). Called when a controller starts; returns how many it removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    table = table or placement_group_table
    remove = remove or (lambda pg_id: remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id))))
    prefix, removed = f"{PROBE_PREFIX}{service}--", 0  # `--` ends a service name (common.vocab.group_app_name)
    for pg_id, info in table().items():
        if str(info.get("name", "")).startswith(prefix) and info.get("state") != "REMOVED":
            remove(pg_id)
            removed += 1
    if removed:
        logger.warning("removed %d probe placement group(s) a previous controller of %s left", removed, service)
    return removed


def probe(action: PlacementAction, service: ServiceShape, timeout_s: float = 10.0, keep: bool = False):
    """Reserve the action's instances all-or-nothing in its domain. Returns the ready placement group if
    `keep`, True if it fit (and was released), False if it did not (nothing is left behind)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles, selectors = probe_bundles(action, service)
    kwargs = {}
    if domain_label(action.scope) is not None:
        kwargs["topology_strategy"] = {domain_label(action.scope): "STRICT_PACK"}
    pg = placement_group(bundles, bundle_label_selector=selectors,
                         name=f"{PROBE_PREFIX}{action.service}--{action.group}", **kwargs)
    ready = False
    try:
        ready = pg.wait(timeout_s)
    finally:  # whatever happens while waiting (a timeout, a GCS error), nothing stays reserved
        if not ready or not keep:
            remove_placement_group(pg)
    logger.info("probe %s %s in %s: %s", action.kind.value, action.group, action.domain,
                "fits" if ready else "does not fit")
    if ready and keep:
        return pg
    return ready


def realize(action: PlacementAction, service: ServiceShape, scale: Callable[[PlacementAction], None],
            timeout_s: float = 10.0) -> bool:
    """Make a GROW/CREATE action real, all or nothing: probe the domain, and only if the whole batch fits call
    `scale(action)` (which sets the DG's pinned Serve deployments' replica counts). Returns whether it did."""
    if not probe(action, service, timeout_s=timeout_s):
        return False
    scale(action)
    return True


def selectors_for(action: PlacementAction) -> dict[str, dict[str, str]]:
    """The label selector each role's replicas of this DG are pinned with (domain + the role's GPU type)."""
    return {Role.PREFILL.value: label_selector(action.scope, action.domain, action.prefill_gpu_type),
            Role.DECODE.value: label_selector(action.scope, action.domain, action.decode_gpu_type)}


SUPPLY_KV_PREFIX = "heteroscale/supply/"


_SUPPLY_ROUNDS = 5  # re-requests while other services' parts keep changing (each round reads them afresh)


def request_supply(service: str, bundles: list[dict], selectors: list[dict], kv=None, request=None) -> int:
    """Ask Ray's cluster autoscaler for `service`'s whole target shape. A request replaces the cluster's previous
    one, so every service's latest shape is kept in Ray's internal KV and the request is their union; empty
    bundles withdraw the service's part. Returns how many bundles the cluster-wide request holds.

    Several services' controllers call this at once, with no lock between them: after its request, each reads
    the parts again and asks again while they changed, so the last request made always holds every part
    written before it (a writer that raced ahead of this one's read re-requests after its own write, and one
    that wrote after is later still). `kv` and `request` stand in for the internal KV and the autoscaler call
    in tests."""
    import json

    if kv is None:
        from ray.experimental import internal_kv as kv
    request = request or (lambda b, s: request_target_shape(b, s, enabled=True))
    if len(bundles) != len(selectors):
        raise ValueError(f"{len(bundles)} bundles but {len(selectors)} label selectors (one per bundle)")
    key = (SUPPLY_KV_PREFIX + service).encode()
    if bundles:
        kv._internal_kv_put(key, json.dumps([bundles, selectors]).encode(), overwrite=True)
    else:
        kv._internal_kv_del(key)

    def union() -> tuple[list, list]:
        all_bundles, all_selectors = [], []
        for other in sorted(kv._internal_kv_list(SUPPLY_KV_PREFIX.encode())):
            raw = kv._internal_kv_get(other)
            if raw:
                b, s = json.loads(raw)
                all_bundles += b
                all_selectors += s
        return all_bundles, all_selectors

    asked = union()
    for _ in range(_SUPPLY_ROUNDS):
        request(*asked)
        now = union()
        if now == asked:
            break
        asked = now
    else:
        logger.warning("node supply: the services' parts kept changing over %d requests; the next tick asks "
                       "again", _SUPPLY_ROUNDS)
    logger.info("node supply: %s asks for %d instances; the cluster-wide request holds %d", service, len(bundles),
                len(asked[0]))
    return len(asked[0])


def withdraw_supply(service: str) -> bool:
    """Take `service`'s part out of the cluster autoscaler's request (undeploy). Returns whether it had one."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_exists((SUPPLY_KV_PREFIX + service).encode()):
        return False
    request_supply(service, [], [])
    return True


def request_target_shape(bundles: list[dict], selectors: list[dict], enabled: bool) -> bool:
    """Ask Ray's cluster autoscaler (v2) for the whole target shape; a no-op unless `enabled` (config flag).

    v2 treats the request as a floor on the cluster's shape (total resources), replacing the previous one."""
    if not enabled:
        return False
    if len(bundles) != len(selectors):
        raise ValueError(f"{len(bundles)} bundles but {len(selectors)} label selectors (one per bundle)")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles, bundle_label_selectors=selectors)
    return True
