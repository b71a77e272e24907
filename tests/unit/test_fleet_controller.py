"""The fleet controller (autoscaler.fleet_controller) over two real service controllers in fleet mode, one fake
Serve and the local cluster's four fake GPUs, no Ray: a high-priority chat service's load takes the best-effort
batch service's only group (withdrawn, then removed), opens its own second group in the freed domain, and gives
it back when the load falls; the budget is never exceeded; status shows the fleet."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from autoscaler.controller import HeteroScaleController
from autoscaler.fleet_controller import FleetController
from common import histogram, wire
from common.config import ConfigError, FleetMember, load_fleet_spec, parse_fleet_spec
from common.vocab import Role, group_app_name
from heteroscale_ray.service import format_fleet_status
from tests.conftest import EXAMPLES
from tests.fakes import Clock, FakeKV, FakeServe, NoMetrics

FAST = {"target_decode_tps_per_instance": 100, "prefill_per_decode": 1.0, "scale_out_cooldown_s": 15,
        "scale_in_cooldown_s": 0, "soft_scale_in_window_s": 30, "control_period_s": 5, "signal_window_s": 10,
        "staleness_limit_s": 5}


class LocalMember:
    """A member controller called in-process (what `RayMember` does through the actor)."""

    def __init__(self, ctl: HeteroScaleController):
        self.ctl = ctl

    def prepare(self, now_s):
        return self.ctl._fleet_prepare(now_s)

    def apply(self, now_s, actions):
        return self.ctl.world.apply(actions, now_s)

    def record(self, now_s, result, observation, view, state):
        return self.ctl._fleet_record(now_s, result, observation, view, state)


class FleetHarness:
    def __init__(self, budget: bool = True):
        fleet = load_fleet_spec(EXAMPLES / "fleet-local.yaml")
        members = tuple(replace(m, spec=replace(m.spec, autoscaling=m.spec.autoscaling.model_copy(update=FAST)))
                        for m in fleet.members)
        self.fleet = replace(fleet, members=members)
        if not budget:
            self.fleet = replace(self.fleet, gpu_budget=None, gpu_budget_by_type={})
        self.serve, self.kv, self.clock = FakeServe(), FakeKV(), Clock()
        self.ctls = {}
        for m in self.fleet.members:
            (group,) = m.spec.deployment_groups
            group = replace(group, prefill_gpu_type="L20", decode_gpu_type="H20")
            self.serve.deploy_group(m.spec, group, 0, "/m")
            self.ctls[m.spec.name] = HeteroScaleController(m.spec, "/m", [(group, 0)], clock=self.clock,
                                                           serve=self.serve, kv=self.kv, metrics=NoMetrics(),
                                                           fleet=self.fleet.name)
        self.serve.calls.clear()
        self.fleet_ctl = FleetController(self.fleet, self.ctls, clock=self.clock, kv=self.kv, autostart=False,
                                         wrap=LocalMember, metrics=NoMetrics())
        self.tokens: dict[str, int] = {}
        self.ttft = {name: histogram.empty() for name in self.ctls}
        self.routable: dict[str, bool] = {}
        self.tables: dict[str, dict] = {}

    def apps(self, service: str) -> list[str]:
        return sorted(a for a in self.serve.apps if a.startswith(group_app_name(service, "")))

    def report(self, tps: dict[str, float], dt: float = 1.0) -> None:
        self.clock.t += dt
        for service, ctl in self.ctls.items():
            for app in self.apps(service):
                group = app.split("--")[1]
                for dep, ids in self.serve.apps[app].items():
                    role = Role.PREFILL if dep.endswith("prefill") else Role.DECODE
                    for rid in ids:
                        self.tokens[rid] = self.tokens.get(rid, 0) + int(tps[service] * dt)
                        answer = asyncio.run(ctl.report_replica(wire.ReplicaReport(
                            rid, group, role.value, self.tokens[rid] if role is Role.DECODE else 0,
                            self.tokens[rid] if role is Role.PREFILL else 0,
                            tbt_hist=tuple(histogram.empty())).to_wire()))
                        self.routable[rid] = answer["routable"]
            histogram.add(self.ttft[service], [0.1] * 5)
            groups = {app.split("--")[1]: tuple(self.ttft[service]) for app in self.apps(service)}
            self.tables[service] = asyncio.run(ctl.report_ingress(wire.IngressReport(f"i-{service}", groups)
                                                                  .to_wire()))["groups"]

    def run(self, seconds: float, tps: dict[str, float]) -> list[dict]:
        out = []
        for _ in range(int(seconds // 5)):
            for _ in range(5):
                self.report(tps)
            out.append(self.fleet_ctl.tick())
            used = out[-1]["budget"]["used_by_type"]
            assert all(used.get(t, 0) <= cap for t, cap in self.fleet.gpu_budget_by_type.items()), used
            assert self.fleet.gpu_budget is None or sum(used.values()) <= self.fleet.gpu_budget
        return out


@pytest.mark.parametrize("budget", [False, True], ids=["cluster-room", "budget"])
def test_a_high_priority_load_takes_the_best_effort_group_and_gives_it_back(budget):
    """Without a budget the cluster lacks room: chat's unplaced group preempts batch's (reason preempted). With
    the example's budget (the whole cluster) the budget's share by priority cuts batch to its floor, zero: a
    forced soft scale-in of its group. Either way: withdrawn whole, then removed, and chat opens in s1-b."""
    h = FleetHarness(budget)
    h.run(10, {"chat": 60, "batch": 60})
    assert h.apps("chat") == ["chat--dg-a"] and h.apps("batch") == ["batch--dg-b"]
    h.run(5, {"chat": 180, "batch": 60})  # chat wants a second group; the only free domain holds batch's
    status = asyncio.run(h.fleet_ctl.status())
    (p,) = status["preemptions"]
    assert (p["kind"], p["service"]) == ("budget" if budget else "group", "batch")
    assert p["for_service"] == "chat" and (p["num_prefill"], p["num_decode"]) == (1, 1)
    batch_ids = [rid for ids in h.serve.apps["batch--dg-b"].values() for rid in ids]
    h.report({"chat": 180, "batch": 60})
    assert not any(h.routable[rid] for rid in batch_ids)  # withdrawn whole: both roles out of routing
    assert h.tables["batch"]["dg-b"]["withdrawn"]  # batch's ingress sends it nothing: it refuses (503) instead
    assert not h.tables["chat"]["dg-a"]["withdrawn"]
    batch_log = asyncio.run(h.ctls["batch"].decision_log())
    assert batch_log[-1]["reason"] == ("budget_limited" if budget else "preempted")
    if not budget:
        assert batch_log[-1]["preempted"][0]["for_service"] == "chat"
    for _ in range(4):  # removed a period later; chat (kept asking through its cooldown) placed the next
        h.run(5, {"chat": 180, "batch": 0})
        h.report({"chat": 180, "batch": 0})
        assert len(h.apps("batch")) + len(h.apps("chat")) <= 2  # batch never took the room back meanwhile
        new = next((n for n in h.tables["chat"] if n != "dg-a"), None)
        if new:
            break
    assert h.tables["chat"][new]["starting"]  # no decode replica has run there yet: the ingress sends it nothing
    h.run(5, {"chat": 180, "batch": 0})
    h.report({"chat": 180, "batch": 0})
    assert not h.tables["chat"][new]["starting"] and h.tables["chat"][new]["weight"] == 1.0
    assert h.apps("batch") == []  # removed; its ingress has no group: requests get 503 + Retry-After
    assert ("delete", "batch--dg-b") in h.serve.calls
    assert sorted(h.serve.domains[a] for a in h.apps("chat")) == ["s1-a", "s1-b"]
    status = asyncio.run(h.fleet_ctl.status())
    assert status["services"]["batch"]["reason"] in ("reclaim", "budget_limited")
    assert status["budget"]["used_by_type"] == {"L20": 2, "H20": 2}
    assert status["services"]["chat"]["priority"] == 10 and status["services"]["batch"]["min_decode"] == 0
    text = format_fleet_status(status)
    assert ("GPUs used 4/4 (H20 2/2, L20 2/2)" if budget else "GPUs used 4/- (none per type)") in text
    assert "preempted at" in text and "for chat" in text
    h.run(90, {"chat": 40, "batch": 0})  # chat's load falls: it withdraws, terminates, and batch comes back
    assert len(h.apps("chat")) == 1 and h.apps("batch")
    assert asyncio.run(h.fleet_ctl.status())["in_progress"] == []


def test_a_restarted_fleet_controller_resumes_its_state():
    h = FleetHarness()
    h.run(10, {"chat": 180, "batch": 60})
    again = FleetController(h.fleet, h.ctls, clock=h.clock, kv=h.kv, autostart=False, wrap=LocalMember,
                            metrics=NoMetrics())
    assert again.ticks == h.fleet_ctl.ticks and again.state == h.fleet_ctl.state


def test_fleet_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"min_decode \(2\) must be <= the service's autoscaling.min_decode"):
        parse_fleet_spec({"name": "f", "services": [{"spec": "fleet-chat.yaml", "min_decode": 2}]}, EXAMPLES)
    with pytest.raises(ConfigError, match="share the name 'chat'"):
        parse_fleet_spec({"name": "f", "services": [{"spec": "fleet-chat.yaml"}, {"spec": "fleet-chat.yaml"}]},
                         EXAMPLES)
    (tmp_path / "a.yaml").write_text((EXAMPLES / "fleet-chat.yaml").read_text())
    (tmp_path / "b.yaml").write_text((EXAMPLES / "fleet-batch.yaml").read_text().replace("/batch", "/chat"))
    with pytest.raises(ConfigError, match="share the ingress.route_prefix '/chat'"):
        parse_fleet_spec({"name": "f", "services": [{"spec": "a.yaml"}, {"spec": "b.yaml"}]}, tmp_path)
    (tmp_path / "b.yaml").write_text((EXAMPLES / "fleet-batch.yaml").read_text().replace("21000", "20200"))
    with pytest.raises(ConfigError, match="share NIXL side-channel ports .* at least 20400"):
        parse_fleet_spec({"name": "f", "services": [{"spec": "a.yaml"}, {"spec": "b.yaml"}]}, tmp_path)
    (tmp_path / "b.yaml").write_text((EXAMPLES / "fleet-batch.yaml").read_text().replace("8000", "8001"))
    with pytest.raises(ConfigError, match="one HTTP host and port"):
        parse_fleet_spec({"name": "f", "services": [{"spec": "a.yaml"}, {"spec": "b.yaml"}]}, tmp_path)
    with pytest.raises(ConfigError, match="gpu_budget_by_type"):
        parse_fleet_spec({"name": "f", "gpu_budget_by_type": {"H20": -1}, "services": [{"spec": "fleet-chat.yaml"}]},
                         EXAMPLES)
    assert isinstance(load_fleet_spec(EXAMPLES / "fleet-local.yaml").members[0], FleetMember)
