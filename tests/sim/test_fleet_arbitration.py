"""Many services, one fleet, simulated (`bench.sim.arbitration`): on a fleet whose GPUs and budget both bind,
our one-cycle arbiter keeps the budget and degrades the classes in priority order; per-service controllers
without an arbiter pass the budget and over-subscribe domains; a static partition keeps the budget and misses
everywhere."""

from __future__ import annotations

import pytest
import yaml

from bench.sim.arbitration import run_all
from bench.sim.days import tuning_and_scoring
from bench.sim.scenarios import scenario_from_dict
from tests.conftest import ROOT

SMALL = ROOT / "bench" / "scenarios" / "small.yaml"


@pytest.fixture(scope="module")
def report():
    data = yaml.safe_load(SMALL.read_text())
    data["name"] = "small-tight"  # 64 GPUs for a peak that wants ~45 without a budget
    data["topology"]["generator"].update(s2=1, s1_per_s2=2, nodes_per_s1=4)
    tuning, scoring = tuning_and_scoring(scenario_from_dict(data, SMALL.parent, SMALL))
    return run_all(tuning, scoring, budget_share=0.8)


def attainment(cls: dict) -> float:
    return min(cls["slo_attainment_ttft"], cls["slo_attainment_tbt"])


def test_the_arbiter_keeps_the_budget_and_degrades_classes_in_priority_order(report):
    v = report["variants"]
    ours, free = v["arbitrated"], v["no_budget"]
    assert report["tuning_day"] != report["scoring_day"]
    assert not ours["budget_exceeded"] and ours["peak_allocated_gpus"] <= report["budget_gpus"]
    assert ours["num_budget_cuts"] > 0 and ours["max_unheld_gpus"] == 0  # the budget's share took capacity
    assert free["num_preemptions"] > 0 and free["max_unheld_gpus"] == 0  # without one, the cluster's room did
    drop = {c: attainment(free["classes"][c]) - attainment(ours["classes"][c]) for c in ("gold", "silver", "bronze")}
    assert drop["gold"] <= 0.01 and drop["gold"] <= drop["silver"] <= drop["bronze"] + 0.01, drop


def test_without_an_arbiter_the_budget_is_passed_and_a_static_partition_misses(report):
    v = report["variants"]
    assert v["uncoordinated"]["budget_exceeded"] and v["uncoordinated"]["gpu_hours_over_budget"] > 0
    assert v["uncoordinated"]["num_preemptions"] == 0
    assert not v["static_partition"]["budget_exceeded"]
    gold = {name: attainment(v[name]["classes"]["gold"]) for name in ("arbitrated", "static_partition")}
    assert gold["static_partition"] < gold["arbitrated"] - 0.1, gold
