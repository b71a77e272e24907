"""Control-loop cost: CPU time and wall time of one controller tick's pure part (the shared cycle: decide +
place + actions) at 1, 10 and 100 deployment groups, on synthetic observations that alternate between
scale-out, hold and soft scale-in, plus the signal store turning reports into an observation (one report per
replica). Writes bench/results/control_loop_cost.json.

    .venv/bin/python bench/scripts/control_loop_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from autoscaler.cycle import ClusterView, CycleConfig, GroupState, cycle  # noqa: E402
from autoscaler.model import (  # noqa: E402
    FleetConfig,
    Observation,
    PolicyConfig,
    PolicyState,
    RoleCounts,
    ServiceObservation,
    Signal,
)
from autoscaler.signals import ReplicaReport, SignalStore  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from common import histogram  # noqa: E402
from common.vocab import DeploymentGroup, NodeInfo, Role  # noqa: E402
from placement.scheduler import ServiceShape  # noqa: E402

TICKS = 200
TARGET_TPS = 100.0


def setup(num_groups: int):
    # one S1 per DG with room for 4 more instances, plus 20 empty S1s for new groups
    nodes = tuple(NodeInfo(f"n{i}-{t}", t, 4, 4 if i >= num_groups else 2, f"s1-{i}", f"s2-{i // 8}")
                  for i in range(num_groups + 20) for t in ("L20", "H20"))
    groups = tuple(GroupState(DeploymentGroup(f"dg-{i}", "svc", "s1", f"s1-{i}", "L20", "H20", 2, 2),
                              RoleCounts(2), RoleCounts(2)) for i in range(num_groups))
    policy = PolicyConfig(target_decode_tps_per_instance=TARGET_TPS, prefill_per_decode=1.0, max_prefill=10_000,
                          max_decode=10_000, scale_out_cooldown_s=0, scale_in_cooldown_s=0,
                          soft_scale_in_window_s=30)
    config = CycleConfig(FleetConfig(services={"svc": policy}),
                         {"svc": ServiceShape("svc", ("L20",), ("H20",), affinity="s1")})
    return nodes, groups, config


def observation(num_groups: int, k: int, now_s: float) -> Observation:
    load = (1.6, 1.0, 0.5)[k % 3]  # scale-out, hold, scale-in
    d = 2 * num_groups
    return Observation({"svc": ServiceObservation(decode_tps=Signal(load * d * TARGET_TPS, now_s),
                                                  ttft_s=Signal(0.3, now_s), tbt_s=Signal(0.02, now_s),
                                                  prefill=RoleCounts(d), decode=RoleCounts(d))})


def measure(num_groups: int) -> dict:
    nodes, groups, config = setup(num_groups)
    view = ClusterView(nodes, {"svc": groups})
    cpu, wall, actions = [], [], 0
    for k in range(TICKS):
        now = 1000.0 + 60 * k
        obs = observation(num_groups, k, now)
        c0, w0 = time.process_time(), time.perf_counter()
        result, _ = cycle(PolicyState(), obs, view, now, config)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        actions += len(result.actions)
    # the signal store: one report per replica (4 per DG), then the observation
    store, ids = SignalStore(keep_s=120), [f"r{i}" for i in range(4 * num_groups)]
    hist = tuple(histogram.empty())
    for t in range(20):
        for i, rid in enumerate(ids):
            store.add_replica(ReplicaReport(rid, f"dg-{i // 4}", Role.DECODE if i % 2 else Role.PREFILL,
                                            float(t), 100 * t, 100 * t, tbt_hist=hist))
    running = {Role.DECODE: ids[1::2], Role.PREFILL: ids[0::2]}
    s0 = time.process_time()
    for _ in range(20):
        store.signals(running, 19.0, 10.0, 5.0, 0.9)
    signals_cpu = (time.process_time() - s0) / 20
    return {"groups": num_groups, "replicas": 4 * num_groups, "ticks": TICKS, "actions": actions,
            "cycle_cpu_ms_p50": round(1000 * statistics.median(cpu), 3),
            "cycle_cpu_ms_max": round(1000 * max(cpu), 3),
            "cycle_wall_ms_p50": round(1000 * statistics.median(wall), 3),
            "signals_cpu_ms": round(1000 * signals_cpu, 3)}


def main() -> int:
    rows = [measure(n) for n in (1, 10, 100)]
    base = rows[0]["cycle_cpu_ms_p50"] or 1e-6
    for row in rows:
        row["cycle_cpu_vs_1_group"] = round(row["cycle_cpu_ms_p50"] / base, 2)
    write_result("control_loop_cost", {"benchmark": "control_loop_cost", "rows": rows,
                                       "note": "pure part of one tick; Ray calls (Serve details, node table, "
                                               "replica updates) are not included"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
