"""Time from a scaling decision to serving capacity: a soft restore (withdrawn replicas rejoin routing) against a
cold start (a new deployment group's replicas start, load the model and are admitted), in one run on the local
labelled cluster with real engines. Writes bench/results/restore_vs_cold.json.

Sequence: heavy load -> the controller scales out (a new DG: cold start); load stops -> a replica pair is
withdrawn; heavy load again while observing -> restored. "Serving capacity" is the moment the controller
counts the replicas routable again (polled every 0.25 s); a replica's routers see it at most
`report_interval_s` + `request_routing_stats_period_s` (1 s + 1 s here) later, which is added as a bound.

    .venv/bin/python bench/scripts/restore_vs_cold.py      # ~6 min
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from common.config import parse_cluster_spec, parse_service_spec  # noqa: E402
from heteroscale_ray import local_cluster  # noqa: E402
from heteroscale_ray import service as svc  # noqa: E402

TEMP_DIR = "/tmp/hsray-bench-restore"
PORT = 8017
AUTOSCALING = {"control_period_s": 1.0, "target_decode_tps_per_instance": 40, "prefill_per_decode": 1.0,
               "ttft_slo_s": 20.0, "tbt_slo_s": 2.0, "max_prefill": 2, "max_decode": 2, "scale_out_cooldown_s": 0,
               "scale_in_cooldown_s": 5, "soft_scale_in_window_s": 60, "signal_window_s": 5,
               "staleness_limit_s": 4, "report_interval_s": 1.0}


def _load(stop: threading.Event, model: str, workers: int = 4) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", timeout=120, max_retries=0)

    def loop():
        for _ in range(5000):
            if stop.is_set():
                return
            try:
                for _ in client.completions.create(model=model, prompt="tell more", max_tokens=48, stream=True):
                    pass
            except Exception as exc:
                print(f"request failed: {exc}", file=sys.stderr)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()


def _status(spec):
    import ray

    from autoscaler import lifecycle

    return ray.get(lifecycle.find(spec.name).status.remote(), timeout=30)


def _ready(st) -> tuple[int, int]:
    return (sum(g["prefill"]["ready"] for g in st["groups"]), sum(g["decode"]["ready"] for g in st["groups"]))


def _wait(spec, predicate, timeout_s: float, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _status(spec)
        if predicate(st):
            return st, time.time()
        time.sleep(poll_s)
    raise TimeoutError(f"condition not met within {timeout_s}s")


def _decision_time(spec, action: str) -> float:
    st = _status(spec)
    return max(d["t"] for d in st["last_decisions"] if d["action"] == action)


def main() -> int:
    cluster_data = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    cluster_data["head"].update(gcs_port=6397, dashboard_port=8281)
    service_data = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())
    service_data["ingress"].update(port=PORT, api_key=None, api_key_env=None)
    service_data["autoscaling"] = {**service_data["autoscaling"], **AUTOSCALING}
    spec = parse_service_spec(service_data)
    state = local_cluster.up(parse_cluster_spec(cluster_data), temp_dir=TEMP_DIR)
    try:
        svc.deploy(spec, state.address, timeout_s=600, progress=lambda m: print(m, file=sys.stderr))
        heavy = threading.Event()
        _load(heavy, spec.model.id)
        _wait(spec, lambda s: (s["target_prefill"], s["target_decode"]) == (2, 2), 120)
        cold_decided = _decision_time(spec, "scale_out")
        _, cold_ready = _wait(spec, lambda s: _ready(s) == (2, 2), 600)
        heavy.set()
        time.sleep(3)
        _wait(spec, lambda s: s["soft_scale_in"] is not None and _ready(s) == (1, 1), 120)
        heavy2 = threading.Event()
        _load(heavy2, spec.model.id)
        _, restored = _wait(spec, lambda s: s["soft_scale_in"] is None and _ready(s) == (2, 2), 120)
        restore_decided = _decision_time(spec, "restore")
        heavy2.set()
        cold_s, restore_s = cold_ready - cold_decided, restored - restore_decided
        propagation_s = AUTOSCALING["report_interval_s"] * 2
        write_result("restore_vs_cold", {
            "benchmark": "restore_vs_cold", "control_period_s": AUTOSCALING["control_period_s"],
            "cold_start_s": round(cold_s, 2), "restore_s": round(restore_s, 2),
            "restore_s_upper_bound_at_routers": round(restore_s + propagation_s, 2),
            "cold_over_restore": round(cold_s / max(restore_s + propagation_s, 1e-3), 1),
            "note": "cold = a new DG (1 prefill + 1 decode engine) from the scale-out decision until the controller "
                    "admits both; restore = from the restore decision until the withdrawn pair is routable again"})
        svc.undeploy(spec.name, state.address)
        return 0
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


if __name__ == "__main__":
    sys.exit(main())
