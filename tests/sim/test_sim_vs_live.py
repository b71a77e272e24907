"""Sim-to-real (issue 20 part 7): the local demo's simulated twin against the recorded live demo in
`bench/results/live_demo/` (`bench/scripts/sim_vs_live.py`), and the twin's inputs refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.scripts.sim_vs_live import RECORDED, compare_run
from bench.sim import twin
from common.config import load_cluster_spec, load_service_spec
from tests.conftest import ROOT

SERVICE = ROOT / "examples" / "service-local.yaml"
CLUSTER = ROOT / "examples" / "cluster-local.yaml"


@pytest.fixture(scope="module")
def report() -> dict:
    return compare_run(RECORDED, load_service_spec(SERVICE), load_cluster_spec(CLUSTER))


def test_the_twin_makes_the_recorded_demo_s_scale_events_in_order(report):
    live = [e["action"] for e in report["events"]["live"]]
    assert live, "the recorded demo scaled"
    assert [e["action"] for e in report["events"]["twin"]] == live


def test_the_twin_is_within_the_goals_of_the_recorded_demo(report):
    assert report["goals_met"], report["misses"]
    for pair in report["events"]["matched"]:
        assert abs(pair["delta_s"]) <= report["goals"]["event_tolerance_s"]


def test_a_run_recorded_without_replay_fields_is_refused_by_name(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    summary = json.loads((run / "summary.json").read_text())
    del summary["replay"]["load_start_unix"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="load_start_unix"):
        twin.LiveRun.load(run)
    (run / "decisions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="decisions.jsonl"):
        twin.LiveRun.load(run)


def test_the_twin_refuses_another_service_s_spec(tmp_path):
    other = tmp_path / "service.yaml"
    other.write_text(SERVICE.read_text().replace("name: tiny-chat", "name: other-chat", 1))
    with pytest.raises(ValueError, match="other-chat"):
        compare_run(RECORDED, load_service_spec(other), load_cluster_spec(CLUSTER))
