"""Fleet simulator (fluid): internal consistency on a small scenario, and parity with direct decide() calls."""

from pathlib import Path

import pytest

from autoscaler.cycle import cycle
from autoscaler.model import PolicyState
from bench.load.traces import RateShape
from bench.sim.model import Capacity, Scenario, SimService, evaluate, oracle_counts
from bench.sim.run import POLICIES
from bench.sim.world import CycleRecord, cycle_config, run_heteroscale
from common.vocab import DeploymentGroup, NodeInfo


def small_scenario() -> Scenario:
    nodes = tuple(NodeInfo(f"n{s2}{s1}{i}", "H20" if i % 2 else "L20", 8, 8, f"s1-{s2}-{s1}", f"s2-{s2}")
                  for s2 in range(2) for s1 in range(2) for i in range(8))
    services = tuple(SimService(f"svc{k}", RateShape(mean_rps=20 + 10 * k, peak_to_trough=3, day_s=7200,
                                                     peak_hour=6 + 3 * k), 600, 300, ttft_slo_s=2.0,
                                tbt_slo_s=0.05, priority=k % 2) for k in range(4))
    return Scenario("small", nodes, services, duration_s=7200, tick_s=30, startup_s=120)


@pytest.fixture(scope="module")
def results():
    scenario = small_scenario()
    return {name: run(scenario) for name, run in POLICIES.items()}


def test_tokens_are_conserved_and_policies_are_ordered(results):
    for name, res in results.items():
        s = res.summary()
        assert s["tokens"]["served"] + s["tokens"]["dropped"] == s["tokens"]["demanded"], name
        assert 0 <= s["slo_attainment_ttft"] <= 1 and 0 <= s["slo_attainment_tbt"] <= 1
        assert s["unplaced_requests"] == 0
    assert results["heteroscale"].summary()["ratio_violations"] == 0  # P and D move together
    assert results["hpa_gpu_util"].summary()["ratio_violations"] > 0  # per-pool scaling drifts off the ratio
    oracle = results["oracle"].gpu_hours
    meeting = {name: res for name, res in results.items()
               if min(res.summary()["slo_attainment_ttft"], res.summary()["slo_attainment_tbt"]) >= 0.99}
    assert "static_peak" in meeting and all(oracle <= res.gpu_hours + 1e-9 for res in meeting.values())
    # Ray Serve LLM's default (target_ongoing_requests 1e9) never scales out on load: it misses the goal
    assert "serve_llm_default" not in meeting
    static = results["static_peak"].summary()
    assert static["slo_attainment_ttft"] >= 0.99  # sized for the peak: meets the goal at every tick
    assert static["slo_attainment_tbt"] == 1.0


def test_sm_activity_never_exceeds_utilization(results):
    s = results["static_peak"].summary()
    assert s["avg_sm_activity"] <= s["avg_gpu_util"] + 1e-9 and 0 < s["avg_gpu_util_by_role"]["decode"] < 1


def test_oracle_counts_meet_the_slos():
    svc = small_scenario().services[0]
    cap = Capacity.of(svc)
    for rps in (1, 10, 50):
        p, d = oracle_counts(svc, cap, rps)
        tick = evaluate(svc, cap, rps, p, d)
        assert tick.attainment_ttft >= 0.99 and tick.attainment_tbt == 1.0
        if p > 1:
            assert evaluate(svc, cap, rps, p - 1, d).attainment_ttft < 0.99  # and it is the fewest


def test_replaying_recorded_cycles_gives_the_same_actions():
    """The simulator acts only through the shared cycle: replaying the observations and cluster views it
    recorded through cycle() directly gives the same actions at every tick (and the run did act)."""
    scenario = small_scenario()
    recorded: list[CycleRecord] = []
    run_heteroscale(scenario, record=recorded, adaptive=False, predict=False)  # cycle_config's defaults
    config, state = cycle_config(scenario), PolicyState()
    assert sum(rec.now_s >= 0 for rec in recorded) == 240  # after the warm-up cycles (t < 0)
    kinds = set()
    for rec in recorded:
        result, state = cycle(state, rec.observation, rec.view, rec.now_s, config)
        assert result.actions == rec.actions, rec.now_s
        kinds |= {a.kind.value for a in rec.actions}
    assert {"create", "scale", "withdraw"} <= kinds


def test_sim_command_writes_the_summary_shape(tmp_path):
    import json

    from heteroscale_ray import cli
    from tests.conftest import ROOT

    assert cli.main(["sim", "--scenario", str(ROOT / "bench" / "scenarios" / "small.yaml"),
                     "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scenario"] == "small" and summary["wall_s"] > 0
    assert set(summary["policies"]) == {"heteroscale", "hpa_gpu_util", "serve_queue", "periodic", "sla_planner",
                                        "static_peak", "oracle"}
    for name, p in summary["policies"].items():
        for key in ("gpu_hours", "avg_gpu_util", "avg_sm_activity", "slo_attainment_ttft", "slo_attainment_tbt",
                    "num_scale_actions", "ratio_violations"):
            assert key in p, (name, key)
        assert 0 <= p["avg_gpu_util"] <= 1 and 0 <= p["slo_attainment_ttft"] <= 1
        assert set(p["gpu_hours_by_role"]) == {"prefill", "decode"}
    assert {"gpu_hours_vs_oracle", "avg_gpu_util_points_above_hpa"} <= set(summary["goals"])
    assert all(Path(f).stat().st_size > 5000 for f in summary["plots"])
    with pytest.raises(ValueError, match=r"unknown policies \['nope'\]"):
        from bench.sim.run import simulate
        from bench.sim.scenarios import load_scenario

        simulate(load_scenario(ROOT / "bench" / "scenarios" / "small.yaml"), ["nope"])


def test_metric_study_reproduces_the_papers_observations():
    from bench.sim.study import metric_study

    rows = metric_study(small_scenario().services[0], points=12)
    loads = [r["rps"] for r in rows]
    tps = [r["decode_tps"] for r in rows]
    # decode TPS is linear in load (until capacity): constant tokens per request
    assert all(abs(t / l - tps[0] / loads[0]) < 1e-6 * t + 1 for t, l in zip(tps[:8], loads[:8]))
    # decode GPU utilization from kernel time per step: the weights are read every step whatever the batch, so
    # it starts high and moves little while decode is memory-bound (a weak load signal), then climbs near
    # capacity; SM activity tracks load; prefill utilization tracks load
    util = [r["decode_gpu_util"] for r in rows]
    assert util[0] > 0.4 and max(util[1:6]) - min(util[1:6]) < 0.1 and max(util) > util[1] + 0.2
    sm = [r["decode_sm_activity"] for r in rows]
    assert all(a < b for a, b in zip(sm[:9], sm[1:9]))
    assert rows[-1]["prefill_gpu_util"] > 5 * rows[1]["prefill_gpu_util"]
    # latency: nearly flat at low load, then a cliff
    assert rows[3]["ttft_p90_s"] < 1.5 * rows[0]["ttft_p90_s"]
    assert rows[-1]["ttft_p90_s"] > 2.5 * rows[0]["ttft_p90_s"]


def test_trace_driven_scenario(tmp_path):
    from bench.sim.run import simulate
    from bench.sim.scenarios import TraceRate, load_scenario
    from bench.load.traces import TraceRequest
    from tests.conftest import ROOT

    rate = TraceRate.from_trace([TraceRequest(ms, 10, 5) for ms in (0, 100, 200, 61_000)], bin_s=60)
    assert rate.rate(30) == pytest.approx(3 / 60) and rate.rate(90) == pytest.approx(1 / 60)
    assert rate.rate(150) == rate.rate(30) and rate.max_rate() == pytest.approx(3 / 60)  # cyclic
    path = ROOT / "bench" / "scenarios" / "small-traces.yaml"
    if not (ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv").exists():
        pytest.skip("shared/traces not beside this checkout")
    scenario = load_scenario(path)
    replay = next(s for s in scenario.services if s.name == "azure-conv")
    assert isinstance(replay.shape, TraceRate) and 4 < replay.shape.max_rate() < 12  # Azure: ~5.5 req/s
    assert all(s.mean_input > 1000 for s in scenario.services)  # sizes from the trace, not constants
    summary, _ = simulate(scenario, ["heteroscale", "oracle"])
    assert summary["policies"]["heteroscale"]["tokens"]["demanded"] > 0


def test_70b_service_with_tensor_parallel_roles():
    svc70 = SimService("big", RateShape(mean_rps=4, peak_to_trough=2, day_s=3600), 1000, 200, ttft_slo_s=3.0,
                       tbt_slo_s=0.1, model="llama-70b", prefill_gpu="H20", decode_gpu="H20", tp_prefill=4,
                       tp_decode=2)
    cap = Capacity.of(svc70)
    assert (cap.prefill.tp, cap.decode.tp) == (4, 2) and cap.cap_decode_tps > 0
    scenario = small_scenario()
    scenario = Scenario("tp", scenario.nodes, (svc70,), duration_s=3600, tick_s=30, startup_s=120)
    result = run_heteroscale(scenario)
    s = result.summary()
    assert s["unplaced_requests"] == 0 and s["ratio_violations"] == 0 and s["gpu_hours"] > 0
    # every instance holds its TP degree of GPUs: 4 per prefill, 2 per decode
    assert all(row[0] % 2 == 0 and row[0] >= 6 for t, row in result.per_tick.items() if t >= 150)


def test_an_infeasible_slo_is_reported_and_no_policy_allocates_beyond_the_fleet():
    from bench.sim.run import simulate

    nodes = tuple(NodeInfo(f"n{i}", "H20" if i % 2 else "L20", 8, 8, f"s1-{i // 2}", "s2-0") for i in range(4))
    hot = SimService("hot", RateShape(mean_rps=400, peak_to_trough=2, day_s=3600), 600, 300, ttft_slo_s=2.0,
                     tbt_slo_s=0.05, priority=1)  # wants far more than 32 GPUs at its peak
    impossible = SimService("impossible", RateShape(mean_rps=2, peak_to_trough=2, day_s=3600), 1250, 100,
                            ttft_slo_s=0.5, tbt_slo_s=0.05, sizes=((500, 100, 0.9), (8000, 100, 0.1)))
    # the long prompts' prefill alone is longer than the TTFT SLO: at most 90 % can meet it
    assert not Capacity.of(impossible).feasible and Capacity.of(hot).feasible
    scenario = Scenario("bounded", nodes, (hot, impossible), duration_s=3600, tick_s=30, startup_s=120)
    summary, results = simulate(scenario, list(POLICIES))
    (bad,) = summary["infeasible_services"]
    assert bad["service"] == "impossible" and bad["best_attainable_ttft_attainment"] == 0.9
    for name, p in summary["policies"].items():
        assert p["peak_allocated_gpus"] <= 32, name  # the fleet has 32 GPUs
        assert 0 < p["gpu_hours"] <= 32 * 1.0 + 1e-6, name
    assert summary["policies"]["oracle"]["unplaced_requests"] > 0  # the bound was hit, and counted
    assert 0 < summary["goals"]["gpu_hours_vs_oracle"] < 10


def test_settings_come_from_the_tuning_day_and_scores_from_the_scoring_day():
    from dataclasses import replace

    from bench.sim.days import DaySpec, day_of
    from bench.sim.run import simulate

    scenario = replace(small_scenario(), days=DaySpec(noise_sigma=0.05, phase_jitter_h=1.0, tuning_day=3,
                                                      scoring_day=4))
    assert day_of(scenario, 3).services[0].shape.rate(600) != day_of(scenario, 4).services[0].shape.rate(600)
    summary, _ = simulate(scenario, ["heteroscale", "hpa_gpu_util", "serve_queue", "periodic"], tune_baselines=True)
    assert (summary["tuned_on"], summary["scored_on"], summary["held_out"]) == ("small@day3", "small@day4", True)
    tuning = summary["tuning"]
    assert set(tuning) == {"hpa_gpu_util_tuned", "serve_queue_tuned", "periodic_tuned"}
    for name, t in tuning.items():
        tried = t["tried_on_tuning_day"]
        assert t["tuned_on"] == "small@day3" and len(tried) >= 5
        meeting = [x for x in tried if x["attainment"] >= 0.99]
        if meeting:  # the cheapest setting that met the goal on the tuning day, whatever it does on the scoring day
            assert t["setting"] == min(meeting, key=lambda x: x["gpu_hours"])["setting"]
        else:
            assert t["setting"] == max(tried, key=lambda x: x["attainment"])["setting"]


def test_each_deployment_group_is_scored_on_its_own():
    """The simulated ingress splits a service's requests by the live routing weights (each DG's scarcer role),
    and each DG is its own prefill queue: a lopsided layout (8P, 1D) + (1P, 8D) misses TTFT that the same
    instances pooled (9P, 9D) meet, and so does an even layout of them."""
    from bench.sim.model import PolicyResult
    from bench.sim.world import SimGroup, SimWorld

    scenario = small_scenario()
    svc = scenario.services[0]
    scenario = Scenario("one", scenario.nodes, (svc,), duration_s=60, tick_s=30)
    cap = Capacity.of(svc)
    rps = 3.0 * cap.cap_prefill_tps / svc.mean_input  # the weights split it evenly: 1.5 prefill instances' each
    pooled = evaluate(svc, cap, rps, 9, 9)
    assert pooled.attainment_ttft > 0.99

    lopsided = SimWorld(scenario)
    even = SimWorld(scenario)
    for world, layout in ((lopsided, ((8, 1), (1, 8))), (even, ((5, 5), (4, 4)))):
        for i, (p, d) in enumerate(layout):
            group = DeploymentGroup(f"g{i}", svc.name, "s1", "s1-0-0", "L20", "H20", p, d)
            world.groups[svc.name][group.name] = SimGroup(p, d, group=group)
    t = next(t for t in range(0, 7200, 30) if svc.shape.rate(t) >= rps)
    ticks = {}
    for name, world in (("lopsided", lopsided), ("even", even)):
        result = PolicyResult()
        world.serve(float(t), result)
        ticks[name] = world.last_ticks[svc.name]
        assert result.requests == pytest.approx(svc.shape.rate(t) * 30)  # every request counted once
        assert result.gpu_hours == pytest.approx(18 * 30 / 3600)  # both groups' GPUs
    assert ticks["even"].attainment_ttft > 0.99 > ticks["lopsided"].attainment_ttft
    assert ticks["lopsided"].ttft_p90_s > ticks["even"].ttft_p90_s  # the drowned group's tail shows


def test_our_groups_stay_in_band_and_on_the_nodes_place_chose():
    scenario = small_scenario()
    s = run_heteroscale(scenario).summary()
    assert s["dg_ratio_violations"] == 0 and s["max_unheld_gpus"] == 0


def test_ours_scored_in_another_process_carries_the_tuning_days_forecast_history():
    """`heteroscale sim` runs ours' tuning-day modes and its scoring as jobs in worker processes: the scoring
    run gets the forecast history the tuning day's run left in another process, and its numbers are those of
    one process doing both (they differ from a run without that history)."""
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    from bench.sim import world
    from bench.sim.curation import DECODE_CANDIDATES, candidate_runs
    from bench.sim.days import DaySpec, tuning_and_scoring
    from bench.sim.run import _hold_days, _simulate_one

    scenario = replace(small_scenario(), name="handover", days=DaySpec(noise_sigma=0.05, tuning_day=3, scoring_day=4))
    tune, score = tuning_and_scoring(scenario)
    mode = {"adaptive": True, "predict": True, "headroom": None, "prefill": None}
    runs = candidate_runs(tune, DECODE_CANDIDATES)  # ours' settings, made here and handed over
    world._HISTORY.clear()  # each worker forks with no history of these days: only what is handed over
    with ProcessPoolExecutor(1, initializer=_hold_days, initargs=(tune, score)) as pool:
        _, (summary, history), _ = pool.submit(_simulate_one, ("mode", "adaptive+forecast", (mode, runs))).result()
    assert set(history) == {s.name for s in scenario.services}
    with ProcessPoolExecutor(1, initializer=_hold_days, initargs=(tune, score)) as pool:
        _, elsewhere, _ = pool.submit(_simulate_one, ("ours", "heteroscale", (mode, runs, history))).result()
    assert run_heteroscale(tune, tuned_on=tune, **mode).summary() == summary
    here = run_heteroscale(score, tuned_on=tune, **mode).summary()
    assert elsewhere.summary() == here
    cold, _ = world._run(score, cycle_config(score, tune, **mode))
    assert cold.summary() != here
