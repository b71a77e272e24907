"""Many services, one fleet, live (issue 23): two services on the local cluster's four fake GPUs (two S1
domains, each one L20 and one H20) under one fleet controller, with real vLLM engines, NIXL and HTTP (four
engines at most, all the cluster holds):
- `chat` (priority 10, one group in s1-a) and `batch` (priority 0, best effort: minimum 0, one group in s1-b);
- a load ramp on chat asks for a second group; no domain has room: batch's group is withdrawn whole, removed one
  period later (Serve drains what it holds), and chat's second group opens in s1-b;
- while batch has no group its requests are refused at once with 503 + Retry-After (counted), none hang;
- chat's load falls and returns within its soft scale-in window: chat restores its own withdrawn group (no
  start-up, no preemption);
- chat's load falls: its second group is withdrawn and terminated, and batch comes back in the freed domain;
- zero failed requests on chat; batch's requests are served or refused with 503, nothing else.
The time from chat's scale-out decision to its new group serving is measured (goal: one control period + the
drain + one cold start), and so is the restore's (goal: one restore). A real Prometheus scrapes the cluster all
along, and the Grafana dashboard's fleet panels' queries draw this fleet's data: GPUs held per type, each
service's priority, batch's preemption.
"""

from __future__ import annotations

import json
import time

import pytest
import ray
import yaml

from autoscaler import lifecycle
from common.config import FleetMember, FleetSpec, parse_cluster_spec, parse_service_spec
from heteroscale_ray import local_cluster, prometheus
from heteroscale_ray import service as svc
from heteroscale_ray.fleet_demo import PacedLoad, serving_decode
from tests.conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.e2e

TEMP_DIR = "/tmp/hsray-e2e-fleet"
PORT = 8021
PROMETHEUS_PORT = 9395
CLUSTER = {"head": {"num_cpus": 0, "memory_gb": 2, "object_store_memory_mb": 256, "gcs_port": 6421,
                    "dashboard_port": 8301},
           "nodes": [{"name": f"{s1}-{t.lower()}", "gpu_type": t, "num_gpus": 1, "s1": s1, "s2": "s2-0",
                      "num_cpus": 1, "memory_gb": 5} for s1 in ("s1-a", "s1-b") for t in ("L20", "H20")]}
AUTOSCALING = {"control_period_s": 2, "target_decode_tps_per_instance": 40, "prefill_per_decode": 1.0,
               "ttft_slo_s": 20.0, "tbt_slo_s": 2.0, "scale_out_cooldown_s": 0, "scale_in_cooldown_s": 10,
               "latency_cooldown_s": 10, "soft_scale_in_window_s": 30, "signal_window_s": 10,
               "staleness_limit_s": 5, "report_interval_s": 1}
LIGHT, RAMP = 1.0, 4.0  # chat: 24 decode tokens/s (0.6 of a replica's target), then 96 (two replicas' worth)


def fleet() -> FleetSpec:
    members = []
    for name, priority, minimum in (("chat", 10, None), ("batch", 0, 0)):
        data = yaml.safe_load((EXAMPLES / f"fleet-{name}.yaml").read_text())
        data["ingress"].update(port=PORT, api_key=None, api_key_env=None, request_timeout_s=60)
        data["autoscaling"].update(AUTOSCALING)
        members.append(FleetMember(parse_service_spec(data), priority, minimum))
    # no budget: the cluster's room binds (the budget's cut is the unit tests' and the demo's)
    return FleetSpec("e2e-fleet", tuple(members), control_period_s=2.0)


@pytest.fixture(scope="module")
def cluster():
    state = local_cluster.up(parse_cluster_spec(CLUSTER), temp_dir=TEMP_DIR)
    try:
        prometheus.start(TEMP_DIR, [f"127.0.0.1:{PORT}"], port=PROMETHEUS_PORT, progress=lambda *_: None)
        yield state
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def ready_groups(status: dict, service: str) -> list[dict]:
    return [g for g in status["services"][service]["groups"] if g["withdrawn"] == 0]


class Watch:
    def __init__(self, name: str, address: str):
        self.name, self.address, self.samples = name, address, []

    def now(self) -> dict:
        st = svc.fleet_status(self.name, self.address)
        self.samples.append((time.time(), st))
        return st

    def until(self, what: str, predicate, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        st = {}
        while time.monotonic() < deadline:
            st = self.now()
            if st.get("services") and predicate(st):
                return st
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: "
                             f"{svc.format_fleet_status(st) if st.get('services') else st}")


def fleet_panels(fleet_name: str, timeout_s: float = 90.0) -> dict[str, dict[tuple, float]]:
    """The dashboard's fleet panels' queries against the Prometheus that scraped this run, once every query
    that should draw (all but the budget's: this fleet sets none) has this fleet's series: per query, its
    series' label values but the fleet's -> value; at `timeout_s`, the last answers (the caller's asserts name
    what is missing)."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "heteroscale.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] if "(fleets only)" in panel["title"] for t in panel["targets"]]
    assert len(exprs) == 4, exprs
    url, deadline = f"http://127.0.0.1:{PROMETHEUS_PORT}", time.monotonic() + timeout_s
    while True:
        got = {}
        for expr in exprs:  # raises with Prometheus's error on a bad query
            got[expr] = {tuple(v for k, v in sorted(r["metric"].items()) if k != "fleet"): float(r["value"][1])
                         for r in prometheus.query(url, expr) if r["metric"].get("fleet") == fleet_name}
        if all(v for e, v in got.items() if "budget" not in e) or time.monotonic() > deadline:
            return got
        time.sleep(5)


def test_a_high_priority_ramp_takes_the_best_effort_group_and_gives_it_back(cluster):
    f = fleet()
    urls = svc.deploy_fleet(f, cluster.address, timeout_s=900)
    try:
        watch = Watch(f.name, cluster.address)
        watch.until("both services holding", lambda st: ready_groups(st, "chat") and ready_groups(st, "batch"), 60)
        model = f.members[0].spec.model.id
        with PacedLoad(urls["chat"], model, LIGHT) as chat, PacedLoad(urls["batch"], model, 0.5) as batch:
            time.sleep(20)
            chat.rate = RAMP
            st = watch.until("batch's group preempted", lambda st: any(
                p["service"] == "batch" for p in st["preemptions"]), 120)
            decided = min(p["t"] for p in st["preemptions"] if p["service"] == "batch")
            watch.until("batch's group removed", lambda st: not st["services"]["batch"]["groups"], 120)
            st = watch.until("chat's second group in s1-b", lambda st: {g["domain"] for g in st["services"]["chat"]
                                                                         ["groups"]} == {"s1-a", "s1-b"}, 120)
            deadline = time.monotonic() + 420
            while serving_decode(f.member("chat").spec, cluster.address) < 2 and time.monotonic() < deadline:
                time.sleep(2)
            assert serving_decode(f.member("chat").spec, cluster.address) == 2, "chat's second group never served"
            took_s = time.time() - decided
            panels = fleet_panels(f.name)
            time.sleep(10)
            # the load falls, and comes back while chat's second group is withdrawn: chat restores its own group
            # (its replicas still run) instead of taking capacity from batch again
            chat.rate = LIGHT / 2
            watch.until("chat's second group withdrawn", lambda st: any(
                g["withdrawn"] for g in st["services"]["chat"]["groups"]), 120)
            back = time.time()
            chat.rate = RAMP
            watch.until("chat's group restored", lambda st: len(ready_groups(st, "chat")) == 2, 60)
            restored = time.time()
            time.sleep(10)
            chat.rate = LIGHT / 2  # the load falls: chat gives its second group back
            watch.until("batch back", lambda st: ready_groups(st, "batch") and len(st["services"]["chat"]["groups"])
                        == 1, 300)
            deadline = time.monotonic() + 420
            while serving_decode(f.member("batch").spec, cluster.address) < 1 and time.monotonic() < deadline:
                time.sleep(2)
            assert serving_decode(f.member("batch").spec, cluster.address) == 1, "batch never served again"
            time.sleep(10)
        final = watch.now()
        print(svc.format_fleet_status(final))
        c, b = chat.summary(), batch.summary()
        print(f"chat {c}; batch {b} (shed: 503 + Retry-After)")
        print(f"from the preemption to chat's new group serving: {took_s:.0f}s")
        chat_log = ray.get(lifecycle.find("chat").decision_log.remote(), timeout=60)
        grown = [d for d in chat_log if back <= d["t"] <= restored and d["action"] in ("restore", "scale_out")]
        assert grown and grown[0]["action"] == "restore", grown[:3]  # its own group back, no new one
        print(f"load back to chat's withdrawn group routable again: {restored - back:.1f}s; from the restore "
              f"decision: {restored - grown[0]['t']:.1f}s (the status read every 1s; reason {grown[0]['reason']})")
        assert all(p["t"] < back for p in final["preemptions"]), final["preemptions"]
        assert c["failed"] == 0 and c["shed"] == 0 and c["ok"] > 0, chat.failures[:5]
        assert b["failed"] == 0 and b["ok"] > 0 and b["shed"] > 0, batch.failures[:5]
        kinds = {p["kind"] for p in final["preemptions"] if p["service"] == "batch"}
        assert kinds == {"group"} and all(p["for_service"] == "chat" for p in final["preemptions"])
        # the Grafana fleet panels draw this fleet: GPUs held per type (chat's two groups, one L20 prefill and one
        # H20 decode each, at most what the cluster has), no budget series (none set), each service's priority,
        # batch's group given up for chat
        print(f"fleet panels: {panels}")
        used, budget, preempted, priority = panels.values()
        assert set(used) == {("H20",), ("L20",)} and all(0 < n <= 2 for n in used.values()), used
        assert budget == {}, budget
        assert priority == {("batch",): 0.0, ("chat",): 10.0}, priority
        taken = sum(p["service"] == "batch" for p in final["preemptions"])  # counted from the first one on
        assert set(preempted) == {("group", "batch")} and 1 <= preempted[("group", "batch")] <= taken, preempted
        log = ray.get(lifecycle.find("batch").decision_log.remote(), timeout=60)
        reasons = [d["reason"] for d in log]
        assert "preempted" in reasons and "reclaim" in reasons, reasons
    finally:
        svc.undeploy_fleet(f, cluster.address)
