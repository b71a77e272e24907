"""The live world of the control cycle: a P/D service on Ray Serve (the second `autoscaler.port.World`).

- observe: each DG application's replicas from Serve's instance details (RUNNING ids, targets), the pushed
  reports in a `SignalStore` (autoscaler.signals) and per-replica membership (autoscaler.membership);
- cluster_view: the accelerator nodes from Ray's node table (`placement.ray_adapter.live_nodes`, free GPUs)
  minus what DG replicas that are not placed yet will take, and each DG's targets and replica states;
- apply: replica targets through Serve's external scaling (`update_deployment_replicas` on the Serve
  controller, the call behind the REST scale endpoint: no dashboard, HTTP or token needed from inside the
  cluster); a new DG is probed all-or-nothing in its domain (`placement.ray_adapter.realize`), then deployed as
  its own application by a one-shot Ray task (so the controller never imports vLLM); growing a DG probes the
  added batch too; an emptied DG's application is deleted; withdrawn counts change membership at once.
Every apply is level-triggered: targets equal to Serve's are not sent again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from autoscaler.cycle import ClusterView, GroupAction, GroupActionKind, GroupState
from autoscaler.membership import GroupMembers, update_members
from autoscaler.model import Observation, RoleCounts, ServiceObservation, Signal
from autoscaler.orphans import decode_group, encode_group, group_key, unknown_groups
from autoscaler.pending import PendingAges
from autoscaler.prometheus_source import PrometheusSource
from autoscaler.serve_client import KV, LiveServe, RoleState, ServeClient, role_states
from autoscaler.settings import ControllerSettings
from autoscaler.signals import ServiceSignals, SignalStore
from autoscaler.supply import SupplyPlan
from common.config import ServiceSpec
from common.vocab import DeploymentGroup, NodeInfo, Role, deployment_name, group_app_name
from common.wire import RoutingEntry, routing_weights
from placement.scheduler import ServiceShape

logger = logging.getLogger(__name__)



@dataclass
class GroupRecord:
    """What the controller keeps per DG (persisted): targets, its NIXL port slot, withdrawn counts, members."""

    group: DeploymentGroup
    slot: int
    withdrawn: dict[Role, int] = field(default_factory=dict)
    members: GroupMembers = GroupMembers()


def service_shape(spec: ServiceSpec) -> ServiceShape:
    return ServiceShape(spec.name, tuple(spec.roles.prefill.gpu_types), tuple(spec.roles.decode.gpu_types),
                        affinity=spec.affinity, gpus_per_prefill=spec.roles.prefill.gpus_per_replica,
                        gpus_per_decode=spec.roles.decode.gpus_per_replica)


class RayWorld:
    """One service's live world. Thread-safe: reports arrive on the actor's event loop, ticks run in a thread."""

    def __init__(self, spec: ServiceSpec, settings: ControllerSettings, model_path: str,
                 records: Mapping[str, GroupRecord], serve: ServeClient | None = None, advisory: bool = False,
                 kv: KV | None = None, deployer: str | None = None):
        self.spec, self.settings, self.model_path = spec, settings, model_path
        self.shape = service_shape(spec)
        self.serve = serve or LiveServe(settings.serve_call_timeout_s, settings.deploy_timeout_s, deployer)
        self.advisory = advisory
        self.records: dict[str, GroupRecord] = dict(records)
        self.store = SignalStore(keep_s=max(3 * settings.signal_window_s, 60.0))
        # Where the signals come from: the pushed reports, or PromQL (the reports then still drive membership)
        self.source = (PrometheusSource(settings.prometheus_url, spec.name) if settings.signal_source == "prometheus"
                       else None)
        self.lock = threading.Lock()
        self.states: dict[str, dict[Role, RoleState]] = {}
        self.last_signals: ServiceSignals | None = None
        self.probe_failures = 0
        self.last_supply: tuple | None = None  # the shape last asked of the cluster autoscaler
        self.observed = False  # Serve's replicas seen at least once
        self.swept = False  # leftover probes of a dead controller removed (`reconcile`, once)
        self.ratio_in_force: float | None = None  # the policy's P:D ratio (set by the controller each tick)
        self.kv = kv  # get/put/delete of bytes: each created group's own record, for adoption (autoscaler.orphans)
        self.retiring: dict[str, float] = {}  # orphan DG -> when its drain is over and its app is deleted
        # groups this controller created whose decode replicas have not run yet: the ingress sends them nothing
        # (a group known at start, or adopted, is taken to have served: a Serve restart shows its replicas not
        # running, and requests then wait for them rather than fail)
        self.fresh: set[str] = set()
        # When each of a DG role's not-Ready replicas started waiting (oldest first; one becoming Ready is taken
        # to be the oldest): past `pending_timeout_s` a replica is stuck, not starting.
        self.pending = PendingAges()  # not-Ready replicas' start times; measured start-ups
        self.now_s = 0.0

    def supply(self, plan: SupplyPlan) -> bool:
        """Ask the cluster autoscaler for the plan's shape when it differs from the last request (a request
        persists until the next one). Returns whether it asked."""
        shape = (plan.bundles, plan.selectors)
        if self.advisory or shape == self.last_supply:
            return False
        self.serve.request_nodes(self.spec.name, [dict(b) for b in plan.bundles], [dict(s) for s in plan.selectors])
        self.last_supply = shape
        if plan.added:
            logger.info("node supply for %s: %s", self.spec.name, plan.summary())
        return True

    # ---- reports (called from the controller's event loop) -------------------------------------------------------

    def routable(self, group: str, role: Role, replica_id: str) -> bool:
        with self.lock:
            record = self.records.get(group)
            if record is None or self.advisory:
                return True  # not a DG we manage (or nothing is actuated): never block it
            return record.members.routable(role, replica_id)

    def routing_table(self) -> dict[str, dict[str, Any]] | None:
        """The ingress's DG table, weights from each DG's routable (running, not withdrawn) prefill and decode
        replicas (`common.wire.routing_weights`); None until this world has seen Serve's replicas once (a
        restarted controller must not announce weight 0 for DGs it has not looked at yet)."""
        with self.lock:
            if not self.observed:
                return None
            records = sorted(self.records.items())
            counts = []
            for name, r in records:
                live = self.states.get(name, {})
                running = {role: live[role].running if role in live else frozenset() for role in Role}
                if running[Role.DECODE]:
                    self.fresh.discard(name)
                counts.append(tuple(len(running[role]) if self.advisory else
                                    sum(r.members.routable(role, i) for i in running[role])
                                    for role in (Role.PREFILL, Role.DECODE)))
            table = {}
            for (name, r), weight in zip(records, routing_weights(counts)):
                whole = not self.advisory and all(r.withdrawn.get(role, 0) >= r.group.count(role) > 0 for role in Role)
                table[name] = RoutingEntry(group_app_name(self.spec.name, name),
                                           deployment_name(self.spec.name, name, Role.DECODE), weight,
                                           r.group, withdrawn=whole, starting=name in self.fresh).to_wire()
            return table

    # ---- the port ------------------------------------------------------------------------------------------------

    def reconcile(self, now_s: float) -> None:
        """The step's first stage (`autoscaler.port.step`), the only one besides `apply` that writes: Serve
        targets that drifted are set back, DG applications without a record adopted or retired, and (once,
        at start) the probe placement groups a dead controller left removed. Advisory mode writes nothing."""
        if self.advisory:
            return
        if not self.swept:  # a controller starting: what a dead one's probe left
            try:
                self.serve.sweep_probes(self.spec.name)
            except Exception:  # noqa: BLE001 (never keeps the controller from starting; logged)
                logger.exception("removing leftover probe placement groups of %s failed", self.spec.name)
            self.swept = True
        details = self.serve.details()
        self._reconcile(details)
        self._orphans(details, now_s)

    def observe(self, now_s: float) -> Observation:
        """Reads only: Serve's replicas, the signals, the counts (writes are `reconcile` and `apply`)."""
        details = self.serve.details()
        with self.lock:
            self.states = {}
            for name, record in self.records.items():
                states = role_states(details, self.spec.name, name)
                if states is not None:
                    self.states[name] = states
                    self._update_members(record, states)
            self._age_pending(now_s)
            running = {role: [i for s in self.states.values() for i in s[role].running] for role in Role}
            if self.source is None:
                sig = self.store.signals(running, now_s, self.settings.signal_window_s,
                                         self.settings.staleness_limit_s, self.settings.slo_quantile)
        if self.source is not None:  # network I/O: not under the lock the reports take
            sig = self.source.signals(running, now_s, self.settings.signal_window_s, self.settings.staleness_limit_s,
                                      self.settings.slo_quantile)
        with self.lock:
            self.last_signals = sig
            self.observed = True
            counts = {role: self._counts(role) for role in Role}
            startup = self.measured_startup()
        return Observation(services={self.spec.name: ServiceObservation(
            decode_tps=sig.decode_tps, prefill_kv_miss_tps=sig.prefill_kv_miss_tps, ttft_s=sig.ttft_s,
            tbt_s=sig.tbt_s, prefill=counts[Role.PREFILL], decode=counts[Role.DECODE],
            admitted_rps=sig.admitted_rps, queued=sig.queued,
            startup_s=Signal() if startup is None else Signal(startup, now_s))})

    def cluster_view(self, now_s: float) -> ClusterView:
        groups, reserve = self.view_parts()
        return ClusterView(reserved(self.serve.nodes(), reserve), {self.spec.name: groups})

    def view_parts(self) -> tuple[tuple[GroupState, ...], list[tuple[DeploymentGroup, Role, int]]]:
        """This service's part of a cluster view: its groups, and the GPUs its replicas not placed yet will take
        that Ray still shows free ((group, role, GPUs) for `reserved`). A fleet's view joins every service's."""
        with self.lock:
            groups, reserve = [], []
            for name, record in sorted(self.records.items()):
                states = self.states.get(name)
                if states is None:  # the DG's app is gone or not visible yet: it holds its targets
                    groups.append(GroupState(record.group, RoleCounts(pending=record.group.num_prefill),
                                             RoleCounts(pending=record.group.num_decode)))
                    continue
                for role in Role:
                    unplaced = max(0, record.group.count(role) - states[role].holding)
                    gpus = getattr(self.spec.roles, role.value).gpus_per_replica
                    if unplaced * gpus:
                        reserve.append((record.group, role, unplaced * gpus))
                groups.append(GroupState(record.group, *self._group_counts(name)))
        return tuple(groups), reserve

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> list[GroupAction]:
        """Every action is tried (one failing does not stop the others); returns those not made real: a probe
        that did not fit, or a call that failed (logged). What failed is not recorded as done."""
        failed = []
        for action in actions:
            name = action.group.name
            try:
                if action.kind is GroupActionKind.CREATE:
                    done = self._create(action)
                elif action.kind is GroupActionKind.REMOVE:
                    with self.lock:
                        known = name in self.records
                    if known:  # (removed already: nothing to do, so applying twice changes nothing)
                        self.serve.delete_app(group_app_name(self.spec.name, name))
                        with self.lock:
                            self.records.pop(name, None)
                            self.fresh.discard(name)
                        if self.kv is not None:
                            self.kv.delete(group_key(self.spec.name, name))
                    done = True
                else:
                    done = self._scale(action)
            except Exception:
                logger.exception("applying %s to %s failed", action.kind.value, name)
                done = False
            if not done:
                failed.append(action)
        return failed

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _reconcile(self, details: dict) -> None:
        """Level-triggered: a Serve target that drifted from the DG's (someone else scaled it) is set back."""
        with self.lock:
            records = list(self.records.items())
        for name, record in records:
            states = role_states(details, self.spec.name, name)
            for role in Role if states else ():
                if states[role].target != record.group.count(role):
                    logger.warning("%s %s target is %d in Serve, %d here: setting it back", name, role.value,
                                   states[role].target, record.group.count(role))
                    self.serve.set_target(group_app_name(self.spec.name, name),
                                          deployment_name(self.spec.name, name, role), record.group.count(role))

    def _orphans(self, details: dict, now_s: float) -> None:
        """Adopt the service's DG applications this world has no record of, or retire them softly
        (`autoscaler.orphans`): out of routing now, deleted once the drain time has passed."""
        with self.lock:
            known = set(self.records)
        unknown = unknown_groups(details, self.spec.name, known)
        self.retiring = {n: t for n, t in self.retiring.items() if n in unknown}
        for name in unknown:
            if name in self.retiring:
                if now_s >= self.retiring[name]:
                    self.serve.delete_app(group_app_name(self.spec.name, name))
                    del self.retiring[name]
                    logger.warning("orphan DG %s: drained, its application deleted", name)
                continue
            why = self._adopt(details, name)
            if why:
                self.retiring[name] = now_s + self.settings.graceful_shutdown_timeout_s
                logger.warning("DG application %s runs without a record here (%s): out of routing, deleted "
                               "after %.0f s of drain", group_app_name(self.spec.name, name), why,
                               self.settings.graceful_shutdown_timeout_s)

    def _adopt(self, details: dict, name: str) -> str:
        """Adopt an unknown DG from its own record; returns why not ('' when adopted)."""
        raw = self.kv.get(group_key(self.spec.name, name)) if self.kv is not None else None
        if not raw:
            return "no group record"
        try:
            group, slot = decode_group(raw)
        except ValueError as exc:
            return str(exc)
        states = role_states(details, self.spec.name, name)
        if (group.name, group.service) != (name, self.spec.name) or states is None:
            return f"its record names {group.service}/{group.name}"
        group = replace(group, num_prefill=states[Role.PREFILL].target, num_decode=states[Role.DECODE].target)
        with self.lock:
            if slot in {r.slot for r in self.records.values()}:
                return f"its port slot {slot} is another group's"
            self.records[name] = GroupRecord(group, slot)
        logger.warning("adopted DG %s (%dP/%dD in %s, slot %d) from its own record", name, group.num_prefill,
                       group.num_decode, group.domain, slot)
        return ""

    def _create(self, action: GroupAction) -> bool:
        with self.lock:
            used = {r.slot for r in self.records.values()}
        slot = min(set(range(len(used) + 1)) - used)

        def deploy(_placement) -> None:
            if self.kv is not None:  # before the deploy: one that times out here but goes through is adopted
                self.kv.put(group_key(self.spec.name, action.group.name), encode_group(action.group, slot))
            self.serve.deploy_group(self.spec, action.group, slot, self.model_path)

        if not self.serve.realize(action.placement, self.shape, deploy, self.settings.probe_timeout_s):
            self.probe_failures += 1
            logger.warning("new DG %s in %s does not fit (probe); the next cycle re-plans", action.group.name,
                           action.group.domain)
            return False
        with self.lock:
            self.records[action.group.name] = GroupRecord(action.group, slot)
            self.fresh.add(action.group.name)
        return True

    def _scale(self, action: GroupAction) -> bool:
        name = action.group.name
        with self.lock:
            record = self.records.get(name)
        if record is None:
            raise KeyError(f"no deployment group {name!r} to scale (have {sorted(self.records)})")
        targets = {role: action.group.count(role) for role in Role}
        with self.lock:
            states = self.states.get(name)
        serve_targets = {r: states[r].target if states else record.group.count(r) for r in Role}
        changed = [role for role in Role if targets[role] != serve_targets[role]]  # level-triggered

        def set_targets(_placement=None) -> None:
            app = group_app_name(self.spec.name, name)
            for role in changed:
                self.serve.set_target(app, deployment_name(self.spec.name, name, role), targets[role])

        grows = any(targets[r] > record.group.count(r) for r in Role)
        if changed:
            if grows and action.placement is not None:
                if not self.serve.realize(action.placement, self.shape, set_targets, self.settings.probe_timeout_s):
                    self.probe_failures += 1
                    logger.warning("growing DG %s does not fit (probe); the next cycle re-plans", name)
                    return False
            else:
                set_targets()
        with self.lock:
            record.group = action.group
            record.withdrawn = {Role.PREFILL: action.withdrawn_prefill, Role.DECODE: action.withdrawn_decode}
            states = self.states.get(name)
            if states is not None:
                self._update_members(record, states)
        return True

    def _update_members(self, record: GroupRecord, states: dict[Role, RoleState]) -> None:
        """Membership from live replicas; while Serve still runs more replicas than the target (stopping some),
        that many stay withdrawn, so a lowered target never reopens routing to a replica about to stop."""
        want = {role: max(record.withdrawn.get(role, 0), len(states[role].running) - record.group.count(role))
                for role in Role}
        load = {}
        for role in Role:
            for rid in states[role].running:
                latest = self.store.latest(rid)
                load[rid] = latest.num_running if latest else 0
        record.members = update_members(record.members, {r: states[r].running for r in Role}, want, load,
                                        self._ratio(), self.settings.ready_ratio_tolerance_instances,
                                        self.settings.ready_ratio_tolerance_fraction)

    def group_summary(self) -> list[dict]:
        """Every DG: domain, GPU types, slot, targets and ready/withdrawn/pending per role (status, decision log)."""
        from dataclasses import asdict

        with self.lock:
            out = []
            for name, record in sorted(self.records.items()):
                counts = self._group_counts(name)
                out.append({"name": name, "domain": record.group.domain, "slot": record.slot,
                            "prefill_gpu_type": record.group.prefill_gpu_type,
                            "decode_gpu_type": record.group.decode_gpu_type,
                            "target_prefill": record.group.num_prefill, "target_decode": record.group.num_decode,
                            "prefill": asdict(counts[0]), "decode": asdict(counts[1])})
            return out

    def _ratio(self) -> float:
        """The ratio the ready-ratio gate holds the groups' admitted replicas to: the one in force."""
        if self.ratio_in_force is not None:
            return self.ratio_in_force
        return self.spec.autoscaling.prefill_per_decode if self.spec.autoscaling else 1.0

    def _group_counts(self, name: str) -> tuple[RoleCounts, RoleCounts]:
        record, states = self.records[name], self.states.get(name)
        out = []
        for role in Role:
            running = states[role].running if states else frozenset()
            withdrawn = sum(1 for i in running if i in record.members.withdrawn.get(role, frozenset()))
            ready = len(running) - withdrawn if self.advisory else \
                sum(1 for i in running if record.members.routable(role, i))
            waiting = max(0, record.group.count(role) - ready - withdrawn)
            bound = self.now_s - self.settings.pending_timeout_s
            stuck = min(waiting, self.pending.older_than(name, role, bound))
            out.append(RoleCounts(ready=ready, pending=waiting - stuck, withdrawn=withdrawn, stuck=stuck))
        return out[0], out[1]

    def _age_pending(self, now_s: float) -> None:
        self.now_s = now_s
        self.pending.update(now_s, {n: {r: rec.group.count(r) for r in Role} for n, rec in self.records.items()},
                            {n: {r: len(st[r].running) for r in Role} for n, st in self.states.items()})

    def measured_startup(self) -> float | None:
        return self.pending.measured_startup()

    def _counts(self, role: Role) -> RoleCounts:
        return RoleCounts.total(self._group_counts(name)[0 if role is Role.PREFILL else 1] for name in self.records)


def reserved(nodes: Sequence[NodeInfo], reserve: Sequence[tuple[DeploymentGroup, Role, int]]) -> tuple[NodeInfo, ...]:
    """The nodes (sorted by id) with each reservation's GPUs taken out of its group's domain (`view_parts`)."""
    by_id = {n.node_id: n for n in nodes}
    for group, role, gpus in reserve:
        _reserve(by_id, group, role, gpus)
    return tuple(by_id[k] for k in sorted(by_id))


def _reserve(nodes: dict[str, NodeInfo], group: DeploymentGroup, role: Role, gpus: int) -> None:
    """Take `gpus` free GPUs of the role's type in the DG's domain (fullest node first) out of the view."""
    gpu_type = group.gpu_type(role)
    for node_id in sorted(nodes, key=lambda k: (nodes[k].free_gpus, k)):
        if gpus <= 0:
            return
        n = nodes[node_id]
        if n.gpu_type == gpu_type and n.domain(group.scope) == group.domain and n.free_gpus:
            take = min(gpus, n.free_gpus)
            nodes[node_id] = replace(n, free_gpus=n.free_gpus - take)
            gpus -= take
