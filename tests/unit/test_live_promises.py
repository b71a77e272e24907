"""The live controller's promises (issue 21), each defect with the test that failed before its fix: against the
fake Serve, KV and clock of `tests/fakes.py` (no Ray)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from autoscaler.cycle import GroupAction, GroupActionKind
from autoscaler.model import (Action, PolicyConfig, Reason, RoleCounts, ServiceObservation, ServiceState,
                              Signal)
from autoscaler.policy import decide_service
from common.vocab import group_app_name
from tests.fakes import SERVICE, Harness, two_groups


def status(h: Harness) -> dict:
    return asyncio.run(h.ctl.status())


def test_a_scale_out_that_did_not_fit_leaves_the_policy_at_the_size_that_exists():
    """Phantom targets: a probe that fails deploys nothing, and the policy's state says so (it kept the higher
    target, so latency steps compounded on a size that never existed)."""
    h = Harness()
    h.serve.fits = False
    entries = h.run(10, decode_tps_each=180)
    assert any(e["action"] == "scale_out" for e in entries)
    assert any(e["failed"] for e in entries)  # the decision log says which actions did not happen
    st = status(h)
    assert (st["target_prefill"], st["target_decode"]) == (1, 1)
    assert h.ctl.errors["apply"] >= 1


def test_one_failing_action_does_not_stop_the_others_and_the_tick_keeps_what_happened():
    """Partial apply: the world applies every action it can and returns the ones it could not (it raised at the
    first failure, after earlier ones had happened, and the tick kept the old state)."""
    h = two_groups()
    world = h.ctl.world
    failing = group_app_name(SERVICE, "dg-a")
    real_set_target = h.serve.set_target

    def set_target(app, deployment, n):
        if app == failing:
            raise ConnectionError("serve controller unreachable")
        real_set_target(app, deployment, n)

    h.serve.set_target = set_target
    a, b = (world.records[name].group for name in ("dg-a", "tiny-chat-s1-b"))
    shrink_a = GroupAction(GroupActionKind.SCALE, replace(a, num_prefill=0, num_decode=0))
    withdraw_b = GroupAction(GroupActionKind.WITHDRAW, b, withdrawn_prefill=1, withdrawn_decode=1)
    failed = world.apply([shrink_a, withdraw_b], 0.0)
    assert [f.group.name for f in failed] == ["dg-a"]
    assert set(world.records["tiny-chat-s1-b"].withdrawn.values()) == {1}
    assert world.records["dg-a"].group == a  # what failed is not recorded as done


CFG = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=0.5, max_prefill=10, max_decode=10,
                   tbt_slo_s=0.2, ttft_slo_s=2.0)
NOW = 1000.0


def test_a_service_without_state_starts_from_what_its_groups_hold():
    """A hold scales in: with no saved state the policy seeded (1P, 2D) from decode and the ratio while one DG
    held 3P + 2D; now the seed is the view, and a hold leaves it."""
    held = ServiceObservation(prefill=RoleCounts(ready=3), decode=RoleCounts(ready=2))  # decode tokens/s missing
    decision, st = decide_service(CFG, None, held, NOW)
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.NO_DATA)
    assert (st.target_prefill, st.target_decode) == (3, 2)


def test_zero_decode_tokens_while_the_ingress_admits_requests_is_missing_data():
    """Zero is not always zero: fresh zero decode tokens/s went to the minimum even while the ingress admitted
    requests (a wedged engine, a silent stats path)."""
    st = ServiceState(2, 4)
    zero = Signal(0.0, NOW)
    idle = ServiceObservation(decode_tps=zero, admitted_rps=Signal(0.0, NOW))
    assert decide_service(CFG, st, idle, NOW)[0].reason is Reason.ZERO_TRAFFIC
    wedged = ServiceObservation(decode_tps=zero, admitted_rps=Signal(3.0, NOW))
    decision, after = decide_service(CFG, st, wedged, NOW)
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.NO_DECODE_PROGRESS) and after == st
    assert "3.00 requests/s admitted" in decision.diagnostics.note


def test_a_live_service_whose_engines_report_no_tokens_under_traffic_is_held():
    h = two_groups()
    entries = h.run(60, decode_tps_each=0)  # the ingress admits 10 requests/s; the engines report no token
    # once the window (10 s) holds only the silent reports: held, never terminated (the first ticks still
    # see tokens from before and may start a soft scale-in, which then waits)
    assert all((e["action"], e["reason"]) == ("hold", "no_decode_progress") for e in entries[3:])
    assert len(h.serve.apps) == 2 and not any(c[0] == "delete" for c in h.serve.calls)


def bad_ratio_spec(tmp_path):
    """A service file pydantic accepts whose autoscaling breaks a rule between fields (max_prefill below what
    the ratio needs at min_decode): before, only the controller actor found it, after every DG was up."""
    import yaml

    from tests.conftest import EXAMPLES

    data = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())
    data["autoscaling"].update(min_decode=2, max_decode=2, max_prefill=1, prefill_per_decode=1.0)
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_runs_every_autoscaling_rule(tmp_path, capsys):
    from heteroscale_ray.cli import main
    from tests.conftest import EXAMPLES

    assert main(["validate", "--service", str(bad_ratio_spec(tmp_path)),
                 "--cluster", str(EXAMPLES / "cluster-local.yaml")]) == 2
    err = capsys.readouterr().err
    assert "autoscaling" in err and "max_prefill (1)" in err


def test_deploy_refuses_a_bad_autoscaling_section_before_anything_starts(tmp_path, monkeypatch):
    import pytest

    from common.config import ConfigError, load_service_spec
    from heteroscale_ray import service

    started = []
    monkeypatch.setattr(service, "connect", lambda address: started.append(address))
    with pytest.raises(ConfigError, match=r"max_prefill \(1\)"):
        service.deploy(load_service_spec(bad_ratio_spec(tmp_path)), "127.0.0.1:1")
    assert started == []


def test_the_gpu_types_place_chose_are_the_ones_deployed():
    """The GPU type was chosen twice: place() fell back to L20 for decode (the preferred H20 full) and the
    deploy path re-resolved H20 from the preference list, pinning the replicas to the full type."""
    import pytest

    from common.config import load_service_spec
    from common.vocab import DeploymentGroup, NodeInfo
    from serving.deployment_groups import PlacementError, plan_group
    from tests.conftest import EXAMPLES

    service = load_service_spec(EXAMPLES / "service-local.yaml")  # decode prefers H20, falls back to L20
    nodes = [NodeInfo("a-l20", "L20", 2, 2, "s1-a", "s2-0"), NodeInfo("a-h20", "H20", 2, 0, "s1-a", "s2-0")]
    placed = DeploymentGroup("dg-x", service.name, "s1", "s1-a", "L20", "L20", 1, 1)
    prefill, decode = plan_group(service, placed, 1, nodes, "/m")
    assert (prefill.gpu_type, decode.gpu_type) == ("L20", "L20")
    assert decode.label_selector and "L20" in str(decode.label_selector)
    # a spec's group (no types yet) still resolves from the preference list; a placed type outside it is refused
    unplaced = DeploymentGroup("dg-y", service.name, "s1", "s1-a", None, None, 1, 1)
    assert plan_group(service, unplaced, 2, nodes, "/m")[1].gpu_type == "H20"
    with pytest.raises(PlacementError, match="A100"):
        plan_group(service, DeploymentGroup("dg-z", service.name, "s1", "s1-a", "A100", "L20", 1, 1), 3, nodes, "/m")


def test_unauthenticated_paths_do_not_grow_the_ingress_metric_labels():
    """Unbounded label: every unauthenticated path became a new `route` label value of the requests counter."""
    from starlette.testclient import TestClient

    from serving import ingress

    ingress._API_KEY["value"] = "secret"
    try:
        client = TestClient(ingress.app)
        for i in range(20):
            assert client.get(f"/scan/{i}/wp-admin.php").status_code == 401
        assert client.post("/v1/completions", json={}).status_code == 401
    finally:
        ingress._API_KEY["value"] = None
    routes = {s.labels["route"] for metric in ingress._REQUESTS.collect() for s in metric.samples
              if s.labels.get("outcome") == "unauthorized"}
    assert routes <= {"other", "/v1/completions", "/v1/chat/completions"} and "other" in routes


def test_figures_from_tests_go_untracked_and_a_script_promotes_them(tmp_path):
    """Test hygiene: the fault and fuzz tests rewrote the tracked bench/results/reliability.json."""
    import json

    from bench.results_io import merge_result
    from bench.scripts.promote_results import promote
    from tests.conftest import ROOT, TEST_RESULTS

    assert not TEST_RESULTS.is_relative_to(ROOT / "bench") and "runs" in TEST_RESULTS.parts  # runs/ is ignored
    import ast

    calls = 0
    for test in (ROOT / "tests").rglob("test_*.py"):
        source = test.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "merge_result" and \
                    test.name != "test_live_promises.py":
                calls += 1
                assert "TEST_RESULTS" in ast.get_source_segment(source, node), f"{test}:{node.lineno}"
    assert calls >= 5
    source, target = tmp_path / "from", tmp_path / "to"
    target.mkdir()
    (target / "reliability.json").write_text(json.dumps({"kept": 1, "fuzz": {"old": True}}))
    merge_result("reliability", "fuzz", {"cases": 7}, source / "reliability.json")
    assert promote(source, target) == ["to/reliability.json: fuzz"]
    assert json.loads((target / "reliability.json").read_text()) == {"kept": 1, "fuzz": {"cases": 7}}


def test_the_prometheus_source_buckets_ttft_like_the_push_path_and_cross_checks_zero():
    """Both sources give the same observation: the ingress's Prometheus TTFT histogram had other buckets than
    the pushed one, and the Prometheus source carried no admitted rate, so its zero could not be checked."""
    from autoscaler.prometheus_source import PrometheusSource
    from common import histogram
    from serving import ingress

    bounds = [float(s.labels["le"]) for m in ingress._TTFT.collect() for s in m.samples
              if s.name.endswith("_bucket")]
    if not bounds:  # no sample yet: the histogram's declared buckets
        bounds = list(ingress._TTFT._upper_bounds)
    assert sorted(set(bounds))[:-1] == list(histogram.BOUNDS_S) and bounds[-1] == float("inf")

    def fetch(url, promql, timeout_s):
        if promql.startswith("max(timestamp("):
            return [{"value": [0, "100.0"]}]
        if "ingress_shed" in promql:
            return []
        if "ingress_routed" in promql:
            return [{"value": [0, "4.0"]}]
        return [{"value": [0, "0" if "tokens_per_second" in promql else "0.1"]}]

    sig = PrometheusSource("http://x", SERVICE, fetch=fetch, wall_clock=lambda: 100.0).signals({}, 100.0, 20, 10, 0.9)
    assert sig.decode_tps.value == 0 and sig.admitted_rps.value == 4.0


def test_every_wait_on_serve_is_bounded(monkeypatch):
    """Blocking calls: `ray.get` without a timeout in the tick thread (details, set_target, deploy_group) froze
    the loop silently behind a stuck Serve controller."""
    import ray
    import ray.serve.context

    from autoscaler.serve_client import LiveServe

    waits = []
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: waits.append(timeout) or {})
    monkeypatch.setattr(ray, "remote", lambda **options: lambda fn: type("Task", (), {"remote": lambda *a: "ref"}))

    class Remote:
        def remote(self, *args, **kwargs):
            return "ref"

    client = type("Client", (), {"_controller": type("Controller", (), {
        "get_serve_instance_details": Remote(), "update_deployment_replicas": Remote()})()})()
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda: client)
    serve = LiveServe(call_timeout_s=7.0, deploy_timeout_s=70.0, deployer="heteroscale_ray.service:deploy_group")
    serve.details()
    serve.set_target("app", "dep", 2)
    serve.deploy_group(None, None, 0, "/m")
    assert waits == [7.0, 7.0, 70.0]
    with pytest.raises(RuntimeError, match="without a DG deployer"):  # the wiring layer must give one
        LiveServe().deploy_group(None, None, 0, "/m")


def test_the_decision_log_file_is_bounded(tmp_path):
    log = tmp_path / "decisions.jsonl"
    h = Harness(decision_log=str(log), decision_log_max_mb=0.002)  # rotate past 2 kB
    h.run(60, decode_tps_each=50)
    rotated = log.with_name("decisions.jsonl.1")
    assert rotated.exists() and log.stat().st_size < 2000 + 5000 and rotated.stat().st_size < 2000 + 5000


def test_the_saved_state_is_versioned_json_and_an_unreadable_one_is_refused_by_name(caplog):
    """State and orphans: the state was a pickle of live classes (a rename made it unreadable)."""
    import json
    import pickle

    import pytest

    from autoscaler import persistence
    from autoscaler.controller import HeteroScaleController
    from autoscaler.persistence import state_key
    from autoscaler.ray_world import GroupRecord
    from tests.fakes import DG_A, NoMetrics

    h = two_groups()
    h.run(10, decode_tps_each=20)  # a soft scale-in in progress: withdrawn replicas, members, soft state
    raw = h.kv[state_key(SERVICE)]
    saved = json.loads(raw)
    assert saved["version"] == persistence.STATE_VERSION and set(saved["records"]) == set(h.ctl.world.records)
    policy, records, ticks = persistence.decode(raw, GroupRecord)
    assert policy == h.ctl.state and records == h.ctl.world.records and ticks == h.ctl.ticks
    with pytest.raises(persistence.StateError, match="version 2"):
        persistence.decode(json.dumps({**saved, "version": 2}).encode(), GroupRecord)
    broken = json.loads(raw)
    del broken["records"]["dg-a"]["slot"]
    with pytest.raises(persistence.StateError, match="records.dg-a.*slot"):
        persistence.decode(json.dumps(broken).encode(), GroupRecord)
    h.kv[state_key(SERVICE)] = pickle.dumps({"an": "older format"})
    again = HeteroScaleController(h.spec, "/m", [(DG_A, 0)], clock=h.clock, serve=h.serve, kv=h.kv,
                                  metrics=NoMetrics(), autostart=False)
    assert not again.resumed and "ignoring the saved controller state" in caplog.text


def test_a_running_replica_without_prometheus_series_makes_the_rate_missing_not_smaller():
    """The Prometheus source undercounted silently: a replica without series lowered the summed demand."""
    from autoscaler.prometheus_source import PrometheusSource
    from common.vocab import Role

    def fetch(url, promql, timeout_s):
        if promql.startswith("group by (replica)"):
            return [{"metric": {"replica": "d1"}, "value": [0, "1"]}] if 'role="decode"' in promql else \
                [{"metric": {"replica": "p1"}, "value": [0, "1"]}]
        if promql.startswith("max(timestamp("):
            return [{"value": [0, "100.0"]}]
        if "ingress_shed" in promql:
            return []
        return [{"value": [0, "150" if "tokens_per_second" in promql else "0.1"]}]

    source = PrometheusSource("http://x", SERVICE, fetch=fetch, wall_clock=lambda: 100.0)
    both = source.signals({Role.DECODE: ["d1", "d2"], Role.PREFILL: ["p1"]}, 100.0, 20, 10, 0.9)
    assert both.decode_tps.value is None and "decode_tps: running replica d2 has no series" in both.note
    assert both.prefill_kv_miss_tps.value == 150.0
    one = source.signals({Role.DECODE: ["d1"], Role.PREFILL: ["p1"]}, 100.0, 20, 10, 0.9)
    assert one.decode_tps.value == 150.0


def test_a_replica_pending_past_the_bound_is_stuck_not_starting_and_its_group_is_cancelled():
    """Long-pending replicas (defect 7): a group whose replicas never start (unplaceable, stuck recovering)
    counted as starting forever, which switched the latency safety net off. Past `pending_timeout_s` they
    count as stuck, the cycle cancels them (a group left without one role goes whole) and the policy's state
    lets go of them, so the next scale-out places that capacity again."""
    from tests.fakes import DG_A, FaultyServe

    serve = FaultyServe()
    serve.deploy_group(None, DG_A, 0, "/m")
    h = Harness(serve=serve, pending_timeout_s=60)
    serve.stuck = True
    entries = h.run(60, decode_tps_each=180)  # scale-out to (2, 2): a second group in s1-b that never starts
    out = next(i for i, e in enumerate(entries) if e["actions"])  # once half a signal window is heard
    assert entries[out]["actions"][0]["kind"] == "create"
    assert all(e["observation"]["decode"] == {"ready": 1, "pending": 1, "withdrawn": 0, "stuck": 0}
               for e in entries[out + 1:])  # starting (the latency safety net waits for it)
    entries = h.run(30, decode_tps_each=180)
    cancel = next(e for e in entries if e["observation"]["decode"]["stuck"])
    assert cancel["observation"]["decode"]["pending"] == 0  # stuck is not starting
    assert [(a["kind"], a["group"], a["why"]) for a in cancel["actions"]] == [("remove", "tiny-chat-s1-b", "stuck")]
    after = entries[entries.index(cancel) + 1]  # the state let go: the demand opens a group again
    assert after["action"] == "scale_out" and after["actions"][0]["kind"] == "create"


def test_a_controller_that_lost_its_state_adopts_the_groups_it_created_and_retires_strays():
    """Orphans (defect 9): groups created at run time were unknown to a controller whose saved state was
    unreadable and held GPUs forever. Each created group has its own record: the new controller adopts it at
    Serve's targets and cuts nothing; an application without a record leaves routing and is deleted only
    after the drain time."""
    from autoscaler.controller import HeteroScaleController
    from autoscaler.persistence import state_key
    from autoscaler.orphans import group_key
    from common.vocab import Role, deployment_name
    from tests.fakes import DG_A, NoMetrics

    h = two_groups()  # dg-a from the service file, tiny-chat-s1-b created by the controller
    assert group_key(SERVICE, "tiny-chat-s1-b") in h.kv and group_key(SERVICE, "dg-a") not in h.kv
    stray = group_app_name(SERVICE, "stray")  # deployed by hand, never the controller's
    h.serve.apps[stray] = {deployment_name(SERVICE, "stray", r): h.serve._ids(1) for r in Role}
    h.kv[state_key(SERVICE)] = b"{not json"  # an unreadable state
    h.ctl = HeteroScaleController(h.spec, "/m", [(DG_A, 0)], clock=h.clock, serve=h.serve, kv=h.kv,
                                  metrics=NoMetrics(), autostart=False)
    assert not h.ctl.resumed and set(h.ctl.world.records) == {"dg-a"}
    h.serve.calls.clear()
    entry = h.ctl.tick()
    assert set(h.ctl.world.records) == {"dg-a", "tiny-chat-s1-b"}  # adopted
    assert h.ctl.world.records["tiny-chat-s1-b"].group.domain == "s1-b"
    assert entry["action"] == "hold" and not [c for c in h.serve.calls if c[0] in ("set_target", "delete")]
    entries = h.run(20, decode_tps_each=90)  # reports again: both groups routed, the stray one not
    assert set(h.table["groups"]) == {"dg-a", "tiny-chat-s1-b"} and stray in h.serve.apps
    assert not any(a["kind"] == "remove" for e in entries for a in e["actions"])
    drain = h.ctl.settings.graceful_shutdown_timeout_s
    h.run(drain, decode_tps_each=90)
    assert stray not in h.serve.apps and ("delete", stray) in h.serve.calls  # retired after its drain
    assert set(h.ctl.world.records) == {"dg-a", "tiny-chat-s1-b"}
