"""A controller that starts with no saved state, on a DG holding more prefill than the ratio implies, with no
traffic yet (issue 21, "a hold scales in"): real engines on a local cluster whose S1 domain has two prefill
GPUs. The landed code seeded the policy from decode and the ratio (1 prefill) and cut the second prefill
replica on its first hold. Now the policy starts from what the group holds, and the surplus prefill goes only
through a scale-in decision: withdrawn, observed for the soft window, then terminated. Three engines.
"""

from __future__ import annotations

import time

import pytest
import ray
import yaml

from autoscaler import lifecycle
from common.config import parse_cluster_spec, parse_service_spec
from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.e2e

TEMP_DIR = "/tmp/hsray-e2e-cold"
PORT = 8015
WINDOW_S = 20.0
CLUSTER = {
    "head": {"num_cpus": 0, "memory_gb": 2, "object_store_memory_mb": 256, "gcs_port": 6417,
             "dashboard_port": 8295},
    "nodes": [{"name": f"s1a-l20-{i}", "gpu_type": "L20", "num_gpus": 1, "s1": "s1-a", "s2": "s2-0", "num_cpus": 1,
               "memory_gb": 5} for i in (1, 2)]
    + [{"name": "s1a-h20", "gpu_type": "H20", "num_gpus": 1, "s1": "s1-a", "s2": "s2-0", "num_cpus": 1,
        "memory_gb": 5}],
}


@pytest.fixture(scope="module")
def cluster():
    state = local_cluster.up(parse_cluster_spec(CLUSTER), temp_dir=TEMP_DIR)
    try:
        yield state
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def spec():
    data = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())
    data["name"] = "tiny-cold"
    data["roles"]["prefill"]["gpu_types"] = ["L20"]
    data["roles"]["decode"]["gpu_types"] = ["H20"]
    data["deployment_groups"] = [{"name": "dg-a", "domain": "s1-a", "prefill_replicas": 2, "decode_replicas": 1}]
    data["ingress"].update(port=PORT, api_key=None, api_key_env=None)
    data["autoscaling"].update(
        control_period_s=2, prefill_per_decode=0.5,  # one decode implies one prefill: the group holds two
        min_prefill=1, max_prefill=2, min_decode=1, max_decode=2, scale_out_cooldown_s=0, scale_in_cooldown_s=0,
        soft_scale_in_window_s=WINDOW_S, signal_window_s=6, staleness_limit_s=5, report_interval_s=1)
    return parse_service_spec(data)


def test_a_controller_without_state_cuts_nothing_before_a_scale_in_and_its_window(cluster):
    s = spec()
    svc.deploy(s, cluster.address, timeout_s=900)  # waits for every engine, then starts the controller
    try:
        ctl = lifecycle.find(s.name)
        seen, deadline = [], time.monotonic() + 120  # bounded: the window, a few periods, slack for a slow CI
        while time.monotonic() < deadline:
            st = ray.get(ctl.status.remote(), timeout=60)
            (group,) = st["groups"]
            seen.append((time.monotonic(), group["target_prefill"], group["prefill"]["withdrawn"]))
            if group["target_prefill"] == 1:
                break
            time.sleep(0.5)
        log = ray.get(ctl.decision_log.remote(0), timeout=60)
        assert not st["resumed"], "a fresh deploy starts without saved state"
        assert log and (log[0]["target_prefill"], log[0]["target_decode"]) == (2, 1), log[0]  # seeded from the view
        cuts = [e for e in log if any(a["kind"] in ("scale", "remove") and a["num_prefill"] < 2 for a in e["actions"])]
        assert cuts, f"the surplus prefill was never scaled in: {[e['action'] for e in log]}"
        cut = cuts[0]
        assert cut["action"] == "terminate_withdrawn", cut
        scale_in = next(e for e in log if e["action"] == "scale_in")
        assert scale_in["withdraw_prefill"] == 1 and scale_in["t"] < cut["t"]
        assert cut["t"] - scale_in["t"] >= WINDOW_S, (scale_in["t"], cut["t"])  # withdrawn, observed, then cut
        before = [e for e in log if e["t"] < cut["t"]]
        assert all(a["num_prefill"] == 2 for e in before for a in e["actions"]), before  # nothing cut earlier
        assert [p for _, p, _ in seen[:-1]] == [2] * (len(seen) - 1)  # Serve's target: 2 until the termination
        assert any(w == 1 for _, _, w in seen), "the replica was withdrawn (out of routing) before it went"
    finally:
        svc.undeploy(s.name, cluster.address)
