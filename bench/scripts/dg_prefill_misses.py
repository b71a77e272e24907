"""Where ours misses TTFT, per deployment group: each DG-tick of ours' scoring-day run, bucketed by how its
prefill stands against its decode at the service's curated ratio (P / (D x r)), with the share of requests it
served and the share of them that missed TTFT and TBT.

The ratio band lets a group hold from ceil((D-1) r) to ceil(D r) prefill. Until 83b797f the router weighted
groups by decode, so a group in the band's lower part got its decode's share of requests with less than its
share of prefill; this measured how much of ours' TTFT miss came from there (94 %), and led to routing by both
roles (`common.wire.routing_weights`). Run now, it shows where the misses that remain come from.

    .venv/bin/python bench/scripts/dg_prefill_misses.py [--scenario bench/scenarios/suite/smooth-diurnal.yaml]

Ours runs in its paper mode (fixed ratio, no forecast), curated on the tuning day, scored on the scoring day.
It reads each DG-tick by wrapping `bench.sim.world.account` (the simulator's per-DG accounting) for the run.
Writes bench/results/dg_prefill_misses.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bench.sim.world as world  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.sim.days import tuning_and_scoring  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402

BUCKETS = ((0.0, 0.8), (0.8, 0.9), (0.9, 0.999), (0.999, float("inf")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=str(ROOT / "bench" / "scenarios" / "suite" / "smooth-diurnal.yaml"))
    args = parser.parse_args()
    tune, score = tuning_and_scoring(load_scenario(args.scenario))
    ratios = {n: c.prefill_per_decode for n, c in world.cycle_config(score, tune).fleet.services.items()}
    rows: list[tuple[float, float, float, float]] = []  # (P / (D r), requests/s, TTFT miss, TBT miss)
    account = world.account

    def recording(result, svc, cap, tick, rps, ready, counts, tick_s, t=None, times=1):
        (p, d), r = ready, ratios.get(svc.name)
        if r and d:
            rows.append((p / (d * r), rps * times, 1 - tick.attainment_ttft, 1 - tick.attainment_tbt))
        return account(result, svc, cap, tick, rps, ready, counts, tick_s, t, times)

    world.account = recording
    try:
        summary = world.run_heteroscale(score, tuned_on=tune, adaptive=False, predict=False).summary()
    finally:
        world.account = account
    total = sum(w for _, w, _, _ in rows) or 1.0
    missed = sum(w * m for _, w, m, _ in rows) or 1.0
    buckets = []
    for lo, hi in BUCKETS:
        part = [(w, m, b) for q, w, m, b in rows if lo <= q < hi]
        served = sum(w for w, _, _ in part)
        buckets.append({"prefill_over_decode_x_ratio": [lo, hi if hi != float("inf") else None],
                        "share_of_requests": round(served / total, 4),
                        "ttft_miss_rate": round(sum(w * m for w, m, _ in part) / served, 4) if served else None,
                        "tbt_miss_rate": round(sum(w * b for w, _, b in part) / served, 4) if served else None,
                        "share_of_ttft_misses": round(sum(w * m for w, m, _ in part) / missed, 4)})
    write_result("dg_prefill_misses", {
        "benchmark": "dg_prefill_misses", "scenario": Path(args.scenario).name, "tuned_on": tune.name,
        "scored_on": score.name, "mode": "fixed ratio, no forecast",
        "ours": {k: summary[k] for k in ("gpu_hours", "slo_attainment_ttft", "slo_attainment_tbt")},
        "buckets": buckets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
