"""The fakes the controller's tests share (no Ray): a Serve that runs replicas at once when a target rises (their
ids appear RUNNING) and stops the newest first when it falls (Serve's own order), the same with faults
(`FaultyServe`: failing calls, replicas that never start), a KV, a metrics sink, a clock, and `Harness`, the
real controller and `RayWorld` over them. Each fake has the methods of the Protocol it stands for
(`autoscaler.serve_client.ServeClient`, `autoscaler.ray_world.KV`)."""

from __future__ import annotations

import asyncio

import yaml

from autoscaler.controller import HeteroScaleController
from common import histogram, wire
from common.config import parse_service_spec
from common.vocab import DeploymentGroup, NodeInfo, Role, deployment_name, group_app_name
from tests.conftest import EXAMPLES

SERVICE = "tiny-chat"
NODES = [NodeInfo(f"{s1}-{t}", t, 1, 1, s1, "s2-0") for s1 in ("s1-a", "s1-b") for t in ("L20", "H20")]


def spec(**autoscaling):
    data = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())
    data["autoscaling"] = {"target_decode_tps_per_instance": 100, "prefill_per_decode": 1.0, "ttft_slo_s": 2.0,
                           "tbt_slo_s": 0.2, "max_prefill": 2, "max_decode": 2, "scale_out_cooldown_s": 0,
                           "scale_in_cooldown_s": 0, "soft_scale_in_window_s": 30, "control_period_s": 5,
                           "signal_window_s": 10, "staleness_limit_s": 5, **autoscaling}
    return parse_service_spec(data, "svc.yaml")


class FakeServe:
    def __init__(self):
        self.apps: dict[str, dict[str, list[str]]] = {}  # app -> deployment -> replica ids (oldest first)
        self.domains: dict[str, str] = {}  # app -> its group's S1 domain
        self.calls: list[tuple] = []
        self.fits = True
        self._next = 0

    def _ids(self, n):
        self._next += n
        return [f"r{i}" for i in range(self._next - n, self._next)]

    def details(self):
        return {"applications": {app: {"deployments": {
            dep: {"target_num_replicas": len(ids), "replicas": [{"replica_id": i, "state": "RUNNING"} for i in ids]}
            for dep, ids in deps.items()}} for app, deps in self.apps.items()}}

    def set_target(self, app, deployment, n):
        self.calls.append(("set_target", app, deployment, n))
        ids = self.apps[app][deployment]
        self.apps[app][deployment] = ids[:n] + self._ids(max(0, n - len(ids)))  # stops the newest first

    def delete_app(self, app):
        self.calls.append(("delete", app))
        self.apps.pop(app)

    def deploy_group(self, spec, group, slot, model_path):
        self.calls.append(("deploy", group.name, slot))
        service = spec.name if spec is not None else SERVICE
        self.apps[group_app_name(service, group.name)] = {
            deployment_name(service, group.name, r): self._ids(group.count(r)) for r in Role}
        self.domains[group_app_name(service, group.name)] = group.domain

    def nodes(self):  # free = total - what the fake's replicas hold, per domain and type
        used = {}
        for app, deps in self.apps.items():
            domain = self.domains.get(app, "s1-a" if app.endswith("dg-a") else "s1-b")
            for dep, ids in deps.items():
                gpu = "L20" if dep.endswith("prefill") else "H20"
                used[(domain, gpu)] = used.get((domain, gpu), 0) + len(ids)
        return [NodeInfo(n.node_id, n.gpu_type, 1, max(0, 1 - used.get((n.s1, n.gpu_type), 0)), n.s1, n.s2)
                for n in NODES]

    def sweep_probes(self, service):
        self.calls.append(("sweep", service))
        return 0

    def realize(self, action, shape, scale, timeout_s):
        self.calls.append(("probe", action.group, action.num_prefill, action.num_decode))
        if self.fits:
            scale(action)
        return self.fits


class FakeKV(dict):
    def get(self, key):
        return super().get(key)

    def put(self, key, value):
        self[key] = value

    def delete(self, key):
        self.pop(key, None)


class NoMetrics:
    def export(self, *typed):
        pass

    def error(self, stage):
        pass


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


DG_A = DeploymentGroup("dg-a", SERVICE, "s1", "s1-a", "L20", "H20", 1, 1)


class Harness:
    def __init__(self, serve=None, kv=None, **autoscaling):
        self.serve, self.kv, self.clock = serve or FakeServe(), kv if kv is not None else FakeKV(), Clock()
        if serve is None:
            self.serve.deploy_group(None, DG_A, 0, "/m")
            self.serve.calls.clear()
        self.spec = spec(**autoscaling)
        self.ctl = HeteroScaleController(self.spec, "/m", [(DG_A, 0)], clock=self.clock, serve=self.serve,
                                         kv=self.kv, metrics=NoMetrics(), autostart=False)
        self.tokens: dict[str, int] = {}
        self.ttft = histogram.empty()
        self.offered = {"admitted": 0, "shed": 0}

    def replicas(self, role):
        return [(app.split("--")[1], rid) for app, deps in self.serve.apps.items() for dep, ids in deps.items()
                if dep.endswith(role.value) for rid in ids]

    def report(self, decode_tps_each: float, dt: float = 1.0, ttft_s: float = 0.1, shed_fraction: float = 0.0) -> dict:
        """Every replica and the ingress report once, `dt` seconds after the last time (the ingress admitted 10
        requests a second and shed `shed_fraction` of what was offered)."""
        self.clock.t += dt
        answers = {}
        for role in Role:
            for group, rid in self.replicas(role):
                self.tokens[rid] = self.tokens.get(rid, 0) + int(decode_tps_each * dt)
                answers[rid] = asyncio.run(self.ctl.report_replica(wire.ReplicaReport(
                    rid, group, role.value, self.tokens[rid] if role is Role.DECODE else 0,
                    self.tokens[rid] if role is Role.PREFILL else 0,
                    tbt_hist=tuple(histogram.empty())).to_wire()))["routable"]
        histogram.add(self.ttft, [ttft_s] * 5)
        self.offered["admitted"] += int(10 * dt)
        self.offered["shed"] += round(10 * dt * shed_fraction / (1 - shed_fraction))
        self.table = asyncio.run(self.ctl.report_ingress(wire.IngressReport(
            "i", {"dg-a": tuple(self.ttft)}, admitted=self.offered["admitted"], shed=self.offered["shed"]).to_wire()))
        return answers

    def run(self, seconds: float, decode_tps_each: float, ttft_s: float = 0.1, shed_fraction: float = 0.0
            ) -> list[dict]:
        entries = []
        for _ in range(int(seconds // 5)):
            for _ in range(5):
                self.report(decode_tps_each, ttft_s=ttft_s, shed_fraction=shed_fraction)
            entries.append(self.ctl.tick())
        return entries


def two_groups() -> Harness:
    h = Harness()
    h.run(10, decode_tps_each=180)
    h.run(10, decode_tps_each=90)
    assert len(h.serve.apps) == 2
    return h


class FaultyServe(FakeServe):
    """The fake Serve with faults: set_target calls that raise, and replicas that never start (`stuck`)."""

    def __init__(self):
        super().__init__()
        self.targets: dict[tuple[str, str], int] = {}
        self.fail_calls = False
        self.stuck = False

    def details(self):
        out = super().details()
        for app, a in out["applications"].items():
            for dep, d in a["deployments"].items():
                d["target_num_replicas"] = self.targets.get((app, dep), d["target_num_replicas"])
        return out

    def set_target(self, app, deployment, n):
        if self.fail_calls:
            raise ConnectionError("serve controller unreachable")
        self.targets[(app, deployment)] = n
        ids = self.apps[app][deployment]
        if n < len(ids) or not self.stuck:
            super().set_target(app, deployment, n)

    def deploy_group(self, spec, group, slot, model_path):
        if self.fail_calls:
            raise ConnectionError("serve controller unreachable")
        super().deploy_group(spec, group, slot, model_path)
        app = group_app_name(SERVICE, group.name)
        for role in Role:
            dep = deployment_name(SERVICE, group.name, role)
            self.targets[(app, dep)] = group.count(role)
            if self.stuck:
                self.apps[app][dep] = []

    def delete_app(self, app):
        super().delete_app(app)
        self.targets = {k: v for k, v in self.targets.items() if k[0] != app}

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(target, running) per deployment."""
        return {(app, dep): (self.targets.get((app, dep), len(ids)), len(ids))
                for app, deps in self.apps.items() for dep, ids in deps.items()}
