"""The scenario suite and the held-out protocol: day generation, validation of the `days:` section, fronts and
their interpolation, and one small suite run end to end (suite.json's shape)."""

from __future__ import annotations

import json

import pytest

from bench.sim.days import day_of, tuning_and_scoring
from bench.sim.scenarios import load_scenario, scenario_from_dict
from bench.sim.model import TIE_GPU_HOURS, choose
from bench.sim.world import HEADROOMS, PREFILL_SCALES
from bench.sim.suite import SUITE_DIR, gpu_hours_at, pareto, run_suite
from tests.conftest import ROOT

SMALL = {"name": "tiny", "duration_s": 3600, "tick_s": 60, "startup_s": 120,
         "topology": {"generator": {"s2": 2, "s1_per_s2": 2, "nodes_per_s1": 4, "gpus_per_node": 8,
                                    "types": ["H20", "L20"]}},
         "services": {"generator": {"count": 2, "seed": 1, "mean_rps": [10, 30], "peak_to_trough": [2, 3],
                                    "mean_input": 600, "mean_output": 300, "ttft_slo_s": 2.0, "tbt_slo_s": 0.05,
                                    "day_s": 3600}}}


def scenario(days: dict):
    return scenario_from_dict({**SMALL, "days": days}, ROOT / "bench" / "scenarios", "tiny.yaml")


def test_settings_whose_gpu_hours_differ_by_less_than_a_days_noise_tie_and_the_tie_goes_to_attainment():
    """Paper-fleet's tuning day chose headroom 1/1.02 (229,027 GPU-h at 0.9941) over 1/1.06 (229,147 at 0.9959)
    by 0.05 %, and the scoring day lost a service to it (0.833)."""
    assert TIE_GPU_HOURS == 0.005
    tried = [{"setting": "tight", "gpu_hours": 229_027.0, "attainment": 0.9941},
             {"setting": "safer", "gpu_hours": 229_147.0, "attainment": 0.9959},
             {"setting": "dearer", "gpu_hours": 231_000.0, "attainment": 0.9990},  # 0.86 % more: not a tie
             {"setting": "missing", "gpu_hours": 200_000.0, "attainment": 0.9800}]  # misses the goal
    assert choose(tried)["setting"] == "safer"
    assert choose(tried[:1] + tried[2:])["setting"] == "tight"
    assert choose(tried[3:])["setting"] == "missing"  # none meets it: the best attainment

def test_days_differ_by_their_seeds_and_repeat_exactly():
    sc = scenario({"noise": {"sigma": 0.05}, "phase_jitter_h": 0.5, "bursts": {"per_day": 2, "factor": 2.0,
                                                                               "duration_s": 300, "share": 1.0}})
    tune, score = tuning_and_scoring(sc)
    assert (tune.name, score.name) == ("tiny@day1", "tiny@day2")
    rates = lambda s: [s.services[0].shape.rate(t) for t in range(0, 3600, 60)]  # noqa: E731
    assert rates(tune) != rates(score)
    assert rates(day_of(sc, 1)) == rates(tune)  # a day is the same day on every run
    spikes = tune.services[0].shape.spikes
    assert len(spikes) == 2 and all(factor == 2.0 and length == 300 for _, length, factor in spikes)


def test_mix_drift_and_prefix_reuse_move_over_the_day():
    trace = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
    if not trace.exists():
        pytest.skip("shared/traces not beside this checkout")
    sc = scenario({"mix": {"path": "../../../shared/traces/azure_llm_2023_conv.csv", "window_s": 300,
                           "phase_s": 600}, "kv_miss": {"low": 0.2, "high": 0.9, "phase_s": 600}})
    svc = day_of(sc, 1).services[0]
    assert len(svc.phases) == 6
    inputs = {svc.at(t).mean_input for t in range(0, 3600, 600)}
    misses = [svc.at(t).kv_miss for t in range(0, 3600, 600)]
    assert len(inputs) > 2 and 0.2 <= min(misses) < max(misses) <= 0.9
    assert svc.kv_miss == pytest.approx(sum(misses) / len(misses), abs=1e-3)  # the day's average: what a profile sees
    # and so are its sizes: the phases' mixes pooled (curation profiles this, never a mix the day did not send)
    means = [svc.at(t).mean_input for t in range(0, 3600, 600)]
    assert svc.mean_input == round(sum(means) / len(means))
    assert sum(w for _, _, w in svc.sizes) == pytest.approx(1.0)
    assert sum(i * w for i, _, w in svc.sizes) == pytest.approx(svc.mean_input, rel=0.02)


def test_pooled_bins_weigh_each_distribution_alike_and_bin_by_input():
    from bench.sim.model import pooled_bins, size_bins

    assert pooled_bins([((100, 10, 1.0),), ((1000, 20, 1.0),)]) == ((100, 10, 0.5), (1000, 20, 0.5))
    rows = [(i, 1 + i % 7) for i in range(10, 5000, 13)]
    once = size_bins(rows)
    twice = pooled_bins([once, once])
    assert sum(w for _, _, w in twice) == pytest.approx(1.0)
    assert sum(i * w for i, _, w in twice) == pytest.approx(sum(i * w for i, _, w in once), rel=1e-3)
    assert [i for i, _, _ in twice] == sorted(i for i, _, _ in twice)  # bins ordered by input, as size_bins
    with pytest.raises(ValueError, match="no request-size distribution"):
        pooled_bins([])


@pytest.mark.parametrize("days, message", [
    ({"tuning_day": 3, "scoring_day": 3}, r"tuning_day and scoring_day \(3\) must differ"),
    ({"noise": {"sigma": -0.1}}, r"days.noise.sigma \(-0.1\) must be a number in \[0, 1\]"),
    ({"bursts": {"per_day": 2, "factor": 2.0}}, r"days.bursts.duration_s \(None\)"),
    ({"kv_miss": {"low": 0.9, "high": 0.2}}, r"low \(0.9\) must be <= high \(0.2\)"),
    ({"typo": 1}, r"unknown keys \['typo'\]"),
    ({"mix": {"path": "nope.csv"}}, r"nope.csv"),
])
def test_a_bad_days_field_is_named_with_file_and_value(days, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        scenario(days)
    if err.type is ValueError:
        assert "tiny.yaml" in str(err.value)


def test_start_up_per_model_and_tp():
    sc = scenario_from_dict({**SMALL, "startup_by_model": {"llama-8b": {"prefill_s": 60, "decode_s": 90}}},
                            ROOT, "tiny.yaml")
    assert sc.services[0].startup(120.0) == (60.0, 90.0)
    with pytest.raises(ValueError, match=r"startup_by_model key \('gpt'\)"):
        scenario_from_dict({**SMALL, "startup_by_model": {"gpt": {"prefill_s": 1, "decode_s": 1}}}, ROOT, "t.yaml")


def test_front_and_interpolation():
    points = [{"attainment": 0.95, "gpu_hours": 100.0}, {"attainment": 0.99, "gpu_hours": 140.0},
              {"attainment": 0.97, "gpu_hours": 150.0}, {"attainment": 1.0, "gpu_hours": 200.0}]
    front = pareto(points)
    assert [p["gpu_hours"] for p in front] == [100.0, 140.0, 200.0]  # (0.97, 150) is beaten by (0.99, 140)
    assert gpu_hours_at(front, 0.97) == pytest.approx(120.0)
    assert gpu_hours_at(front, 0.99) == 140.0 and gpu_hours_at(front, 0.90) == 100.0
    assert gpu_hours_at(front, 1.0001) is None


def test_every_shipped_scenario_loads_with_its_days():
    for path in sorted(SUITE_DIR.glob("*.yaml")) + sorted((ROOT / "bench" / "scenarios").glob("*.yaml")):
        if "traces" in path.read_text() and not (ROOT.parent / "shared" / "traces").exists():
            continue
        sc = load_scenario(path)
        assert sc.days is not None and sc.days.tuning_day != sc.days.scoring_day, path.name


def test_a_small_suite_writes_every_policy_tuned_on_one_day_and_scored_on_another(tmp_path):
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text("# Tiny: two services, noisy hour-long days.\n" + yaml.safe_dump(
        {**SMALL, "days": {"noise": {"sigma": 0.05}, "phase_jitter_h": 0.2, "profile_error": 0.03}}))
    lines = []
    report = run_suite([str(path)], workers=1, progress=lines.append)
    json.dumps(report)  # JSON-ready
    assert lines and "simulation runs" in lines[0]
    sc = report["scenarios"]["tiny"]
    assert (sc["tuned_on"], sc["scored_on"]) == ("tiny@day1", "tiny@day2")
    assert sc["stresses"].startswith("Tiny")
    policies = sc["policies"]
    assert {"heteroscale", "oracle", "static_peak", "hpa_gpu_util", "serve_queue", "serve_llm_default", "periodic",
            "sla_planner"} <= set(policies)
    for name, p in policies.items():
        for key in ("gpu_hours", "slo_attainment_ttft", "slo_attainment_tbt", "dg_ratio_violations",
                    "gpu_hours_at_heteroscale_attainment", "gpu_hours_at_goal", "front"):
            assert key in p, (name, key)
        assert p["gpu_hours_at_goal"] == gpu_hours_at(p["front"], report["attainment_goal"])
        assert p["front"] and all(0 <= q["attainment"] <= 1 for q in p["front"])
    assert policies["heteroscale"]["dg_ratio_violations"] == 0
    front = policies["heteroscale"]["front"]  # nothing on it beaten on both GPU-hours and attainment
    assert all(a["gpu_hours"] < b["gpu_hours"] and a["attainment"] < b["attainment"] for a, b in zip(front, front[1:]))
    # ours' setting is chosen on the tuning day by the baselines' rule: each mode (ratio fixed or adaptive,
    # forecast or not) at the curated targets and over the decode headrooms, then the best so far over the
    # prefill scales
    mode = policies["heteroscale"]["mode"]
    tried = [{"setting": m, "gpu_hours": v["gpu_hours"], "attainment": v["attainment"]}
             for m, v in mode["tuning_day"].items()]
    modes = {"fixed", "adaptive", "fixed+forecast", "adaptive+forecast"}
    headrooms = {f"{m} at headroom 1/{h:.2f}" for m in modes for h in HEADROOMS}
    second = choose([t for t in tried if t["setting"] in modes | headrooms])["setting"]
    assert set(mode["tuning_day"]) == modes | headrooms | {f"{second}, prefill x{f:.2f}" for f in PREFILL_SCALES}
    assert mode["chosen"] == choose(tried)["setting"]
    assert policies["heteroscale"]["gpu_hours"] == mode["scoring_day_curated"][mode["chosen"]]["gpu_hours"]
    # and beside it its mode at the curated targets and the paper's mode
    chosen_mode = mode["chosen"].split(" at ")[0].split(",")[0]
    assert chosen_mode in modes
    assert set(mode["scoring_day_curated"]) == {mode["chosen"], chosen_mode, "fixed"}
    # the point a baseline reports is the one its tuning day chose, scored on the scoring day
    assert policies["sla_planner"]["setting"] in [{"headroom": h} for h in (1.0, 1.02, 1.04, 1.06, 1.1, 1.15, 1.2)]
