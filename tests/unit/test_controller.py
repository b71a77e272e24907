"""The controller's logic (autoscaler.controller + autoscaler.ray_world) against a fake Serve, KV and clock: no Ray.

The fake Serve runs replicas at once when a target rises (their ids appear RUNNING) and stops the newest first
when it falls (Serve's own order), so the tests see what the controller sends, which replicas it withdraws,
what it answers to reports, how it routes, and what it does after a restart.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest

from autoscaler.controller import HeteroScaleController
from common import wire
from common.vocab import Role, deployment_name, group_app_name
from tests.fakes import DG_A, SERVICE, FakeServe, Harness, NoMetrics, spec, two_groups

# (the fakes and the Harness are in tests/fakes.py, shared with the promise, contract and stateful suites)


def test_load_scales_both_pools_out_together_and_opens_a_second_group_when_the_first_domain_is_full():
    h = Harness()
    entries = h.run(10, decode_tps_each=180)  # 180 tokens/s on one decode replica at 100 each -> D = 2, P = 2
    acted = [e for e in entries if e["actions"]]
    assert acted and acted[0]["action"] == "scale_out" and acted[0]["reason"] == "proportional"
    # s1-a has one L20 and one H20 (both taken): the new batch opens dg in s1-b, probed first, then deployed
    assert ("deploy", "tiny-chat-s1-b", 1) in h.serve.calls
    assert any(c[0] == "probe" and c[2:] == (1, 1) for c in h.serve.calls)
    assert group_app_name(SERVICE, "tiny-chat-s1-b") in h.serve.apps
    status = asyncio.run(h.ctl.status())
    assert (status["target_prefill"], status["target_decode"]) == (2, 2)
    assert {g["name"]: g["slot"] for g in status["groups"]} == {"dg-a": 0, "tiny-chat-s1-b": 1}
    # the next tick admits the new replicas (gating keeps the ratio), and the ingress learns the new DG
    h.run(5, decode_tps_each=90)
    assert all(h.report(90).values())
    assert {n: e["weight"] for n, e in h.table["groups"].items()} == {"dg-a": 1.0, "tiny-chat-s1-b": 1.0}


def test_load_shed_at_the_ingress_counts_as_demand_so_a_capped_pool_scales_out():
    h = Harness()
    capped = h.run(10, decode_tps_each=90)  # 90 tokens/s at a target of 100: one decode replica is enough
    assert all(e["action"] == "hold" for e in capped)
    entries = h.run(10, decode_tps_each=90, shed_fraction=0.5)  # ... but half the requests were refused
    out = [e for e in entries if e["action"] == "scale_out"]
    assert out and (out[0]["target_prefill"], out[0]["target_decode"]) == (2, 2)
    match = re.search(r"(\d+) of (\d+) requests shed in the window: decode demand x([\d.]+)",
                      out[0]["observation"]["note"])
    shed, offered, factor = int(match[1]), int(match[2]), float(match[3])
    assert shed > 0 and factor == pytest.approx(offered / (offered - shed), abs=0.01) and factor > 1.1
    assert out[0]["observation"]["decode_tps"] == pytest.approx(90.0 * factor, rel=0.05)


def test_a_failed_probe_deploys_nothing_and_the_next_cycle_tries_again():
    h = Harness()
    h.serve.fits = False
    h.run(10, decode_tps_each=180)
    assert not any(c[0] == "deploy" for c in h.serve.calls) and h.ctl.world.probe_failures >= 1
    assert set(h.serve.apps) == {group_app_name(SERVICE, "dg-a")}
    h.serve.fits = True
    h.run(5, decode_tps_each=180)
    assert any(c[0] == "deploy" for c in h.serve.calls)


def test_load_drop_withdraws_observes_then_terminates_and_removes_the_emptied_group():
    h = two_groups()
    entries = h.run(10, decode_tps_each=20)  # 40 tokens/s in all (10 s window): D = 1, P = 1
    assert entries[-1]["action"] == "scale_in"
    withdrawn = [rid for rid, ok in h.report(20).items() if not ok]
    assert len(withdrawn) == 2  # one prefill and one decode replica, both in the same (emptied) DG
    assert not h.serve.calls or all(c[0] != "set_target" for c in h.serve.calls[-2:])  # still running
    table = h.table["groups"]
    assert sorted(e["weight"] for e in table.values()) == [0.0, 1.0]  # no new requests to the withdrawn DG
    entries = h.run(30, decode_tps_each=20)
    assert [e["action"] for e in entries if e["action"] != "hold"] == ["terminate_withdrawn"]
    assert ("delete", group_app_name(SERVICE, "tiny-chat-s1-b")) in h.serve.calls or \
        ("delete", group_app_name(SERVICE, "dg-a")) in h.serve.calls
    assert len(h.serve.apps) == 1 and all(h.report(20).values())


def test_slo_degradation_while_observing_restores_at_once():
    h = two_groups()
    h.run(10, decode_tps_each=20)
    assert sum(not ok for ok in h.report(20).values()) == 2
    entries = h.run(5, decode_tps_each=20, ttft_s=8.0)  # TTFT 4x its SLO
    assert entries[-1]["action"] == "restore" and entries[-1]["reason"] == "soft_scale_in_slo_degraded"
    assert all(h.report(20).values()) and len(h.serve.apps) == 2  # nothing was stopped


def test_a_restarted_controller_resumes_its_state_and_takes_no_spurious_action():
    h = two_groups()
    h.run(10, decode_tps_each=20)  # a soft scale-in is in progress
    calls_before = list(h.serve.calls)
    again = HeteroScaleController(h.spec, "/m", [(DG_A, 0)], clock=h.clock, serve=h.serve, kv=h.kv,
                                  metrics=NoMetrics(), autostart=False)
    assert again.resumed and set(again.world.records) == set(h.ctl.world.records)
    # before its first look at Serve it announces no routing table (never weight 0 for DGs it has not seen)
    assert asyncio.run(again.report_ingress(wire.IngressReport("i").to_wire()))["groups"] is None
    entry = again.tick()  # no reports yet since the restart: hold, never scale in
    assert entry["action"] == "hold" and entry["reason"] == "no_data"
    assert h.serve.calls == calls_before + [("sweep", SERVICE)]  # only the leftover-probe sweep of a start
    status = asyncio.run(again.status())
    assert status["soft_scale_in"] is not None


def test_missing_signals_hold_and_advisory_actuates_nothing():
    h = Harness()
    entry = h.ctl.tick()  # no report at all
    assert entry["action"] == "hold" and entry["reason"] == "no_data" and "no fresh report" in \
        entry["observation"]["note"]
    advisory = Harness(advisory=True)
    entries = advisory.run(10, decode_tps_each=180)
    assert any(e["action"] == "scale_out" and e["advisory"] for e in entries)
    assert advisory.serve.calls == [] and len(advisory.serve.apps) == 1
    assert all(advisory.report(180).values())


def test_a_failing_world_is_counted_and_the_next_tick_runs():
    h = Harness()

    def broken():
        raise ConnectionError("serve controller unreachable")

    h.serve.details = broken
    assert h.ctl.tick() is None and h.ctl.errors["step"] == 1
    h.serve.details = FakeServe.details.__get__(h.serve)
    h.report(50)
    assert h.ctl.tick() is not None


def test_bad_reports_are_refused_with_the_field():
    h = Harness()
    with pytest.raises(ValueError, match="bad replica report.*missing field 'group'"):
        asyncio.run(h.ctl.report_replica({"v": 1, "replica_id": "x", "role": "decode"}))
    with pytest.raises(ValueError, match="bad replica report.*version 7"):
        asyncio.run(h.ctl.report_replica({"v": 7}))
    with pytest.raises(ValueError, match="bad ingress report.*'admitted' = 'lots'"):
        asyncio.run(h.ctl.report_ingress({"v": 1, "ingress_id": "i", "admitted": "lots"}))


def test_what_the_controller_recorded_replays_through_the_simulators_driver_to_the_same_actions():
    import pickle

    from bench.sim.replay import replay

    h = two_groups()
    h.run(40, decode_tps_each=20)  # withdraw, observe, terminate, remove
    records = pickle.loads(asyncio.run(h.ctl.recorded_cycles()))
    replayed = replay(records, h.ctl.config)
    assert [actions for _, actions in replayed] == [r[3] for r in records]
    kinds = {a.kind.value for r in records for a in r[3]}
    assert {"create", "withdraw", "remove"} <= kinds


def test_a_target_changed_behind_the_controllers_back_is_set_back():
    h = Harness()
    app, dep = group_app_name(SERVICE, "dg-a"), deployment_name(SERVICE, "dg-a", Role.DECODE)
    h.serve.set_target(app, dep, 2)  # someone scales decode by hand
    h.serve.calls.clear()
    h.report(20)
    h.ctl.world.observe(h.clock.t)  # observing only reads (issue 21): reconciling is the step's own stage
    assert h.serve.calls == [] and len(h.serve.apps[app][dep]) == 2
    h.ctl.tick()
    assert ("set_target", app, dep, 1) in h.serve.calls and len(h.serve.apps[app][dep]) == 1
    h.serve.calls.clear()
    h.report(20)
    h.ctl.tick()
    assert not any(c[0] == "set_target" for c in h.serve.calls)  # nothing to do when Serve agrees


def test_the_prometheus_signal_source_drives_the_policy_and_an_unreachable_server_holds():
    """`signal_source: prometheus`: the controller's signals come from PromQL (here a fake HTTP answer, the
    queries as sent), reports still drive membership; Prometheus unreachable -> hold, never scale in, and why."""
    h = Harness(signal_source="prometheus", prometheus_url="http://127.0.0.1:9390")
    sent = []

    def fetch(url, promql, timeout_s):
        sent.append(promql)
        if promql.startswith("group by (replica)"):  # every running replica exports
            role = Role.DECODE if 'role="decode"' in promql else Role.PREFILL
            return [{"metric": {"replica": rid}, "value": [0, "1"]} for _, rid in h.replicas(role)]
        if promql.startswith("max(timestamp("):
            return [{"value": [0, str(h.clock.t)]}]  # fresh samples (the fake wall clock is the test clock)
        if "ingress_shed" in promql:
            return []  # nothing shed: no series
        return [{"value": [0, "180" if "decode_tokens_per_second" in promql else "0.1"]}]

    h.ctl.world.source._fetch, h.ctl.world.source._wall = fetch, h.clock
    entries = h.run(5, decode_tps_each=0)  # the pushed reports say nothing is decoded; Prometheus says 180
    assert entries[-1]["action"] == "scale_out" and entries[-1]["observation"]["decode_tps"] == 180.0
    assert any('service="tiny-chat",role="decode"' in q for q in sent)

    def down(url, promql, timeout_s):
        raise OSError("connection refused")

    h.ctl.world.source._fetch = down
    entry = h.run(5, decode_tps_each=0)[-1]
    assert (entry["action"], entry["reason"]) == ("hold", "no_data")
    assert entry["observation"]["note"].startswith("prometheus at http://127.0.0.1:9390 unavailable")


def test_the_prometheus_source_needs_its_url():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="signal_source 'prometheus' needs prometheus_url"):
        spec(signal_source="prometheus")


def test_the_controllers_gauges_come_from_the_typed_observation_and_decision(monkeypatch):
    """Metrics export reads the typed cycle result (it read the decision-log dict): replicas per state (stuck
    included), GPUs held, the decode tokens/s the targets can carry, the decision and the tick time."""
    from ray.util import metrics

    from autoscaler.outputs import ControllerMetrics
    from autoscaler.model import (Action, Diagnostics, Reason, RoleCounts, ServiceDecision, ServiceObservation,
                                  Signal)

    seen = []

    class Recorder:
        def __init__(self, name, *args, **kwargs):
            self.name = name

        def set(self, value, tags=None):
            seen.append((self.name, value, tuple(sorted((tags or {}).items()))))

        def inc(self, value=1, tags=None):
            self.set(value, tags)

    monkeypatch.setattr(metrics, "Gauge", Recorder)
    monkeypatch.setattr(metrics, "Counter", Recorder)
    m = ControllerMetrics("svc", {"prefill": 1, "decode": 2})
    obs = ServiceObservation(decode_tps=Signal(120.0, 1.0), prefill=RoleCounts(1), decode=RoleCounts(2, 1, 0, 1))
    m.export(5.0, replace(obs, prefill_kv_miss_tps=Signal(900.0, 1.0)),
             ServiceDecision(Action.HOLD, Reason.NO_DATA, 1, 3,
                             diagnostics=Diagnostics(ratio_estimate=0.4, forecast_decode_tps=321.0)), 100.0,
             0.5)
    values = {(n, dict(t).get("role"), dict(t).get("state")): v for n, v, t in seen}
    assert values[("heteroscale_controller_replicas", "decode", "stuck")] == 1
    assert values[("heteroscale_controller_replicas", "decode", "target")] == 3
    assert values[("heteroscale_controller_allocated_gpus", "decode", None)] == 8  # 4 replicas x 2 GPUs
    assert values[("heteroscale_controller_target_decode_tokens_per_second", None, None)] == 300.0
    assert values[("heteroscale_controller_decode_tokens_per_second", None, None)] == 120.0
    kinds = {dict(t).get("kind"): v for n, v, t in seen if n == "heteroscale_controller_prefill_per_decode_ratio"}
    assert kinds == {"in_force": 0.5, "estimate": 0.4}
    assert values[("heteroscale_controller_prefill_kv_miss_tokens_per_second", None, None)] == 900.0
    assert values[("heteroscale_controller_forecast_decode_tokens_per_second", None, None)] == 321.0
    assert ("heteroscale_controller_decisions_total", 1, (("action", "hold"), ("reason", "no_data"),
                                                          ("service", "svc"))) in seen


def test_the_routing_table_weighs_each_group_by_its_scarcer_role():
    """KV never leaves a DG: a group whose prefill replica is gone (it died; its replacement does not start) gets
    no new requests, and the table's weights (in decode replicas) go to the group that can serve them."""
    from tests.fakes import FaultyServe

    serve = FaultyServe()
    serve.deploy_group(None, DG_A, 0, "/m")
    h = Harness(serve=serve)
    h.run(10, decode_tps_each=180)
    h.run(10, decode_tps_each=90)
    assert {n: e["weight"] for n, e in h.table["groups"].items()} == {"dg-a": 1.0, "tiny-chat-s1-b": 1.0}
    serve.stuck = True
    serve.apps[group_app_name(SERVICE, "dg-a")][deployment_name(SERVICE, "dg-a", Role.PREFILL)] = []
    h.run(5, decode_tps_each=90)
    h.report(90)  # the table the ingress gets after the tick that saw it
    assert {n: e["weight"] for n, e in h.table["groups"].items()} == {"dg-a": 0.0, "tiny-chat-s1-b": 2.0}
