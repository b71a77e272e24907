"""Where ours' SLO misses come from: each DG-tick of ours' scoring-day run (the setting curation chose on the
tuning day), bucketed by the group's routable decode replicas and by whether its decode pool was saturated
(asked for more tokens/s than it served), with the share of the day's requests it served and the share of
them that missed TTFT and TBT (in points of attainment: they add up to the fleet's misses).

    .venv/bin/python bench/scripts/miss_sources.py [--scenario bench/scenarios/suite/bursty.yaml ...]

It reads each DG-tick by wrapping `bench.sim.world.evaluate` (the simulator's per-DG model call) for the run.
Writes bench/results/miss_sources.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bench.sim.world as world  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.sim.days import tuning_and_scoring  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402

SIZES = ((1, 2), (3, 5), (6, 10), (11, None))  # routable decode replicas of a group, inclusive


def _size(d: int) -> str:
    for lo, hi in SIZES:
        if d >= lo and (hi is None or d <= hi):
            return f"{lo}-{hi}" if hi else f"{lo}+"
    return "0"


def _order(size: str) -> int:
    return int(size.split("-")[0].rstrip("+"))


def measure(path: str) -> dict:
    tune, score = tuning_and_scoring(load_scenario(path))
    rows: dict[tuple[str, bool], list[float]] = {}
    evaluate, serve = world.evaluate, world.SimWorld.serve
    day = {"t": None}

    def recording_serve(self, now_s, result):
        if day["t"] is not None and now_s < day["t"]:
            rows.clear()  # a new run (the forecast's day before ran first): keep the scoring day's only
        day["t"] = now_s
        serve(self, now_s, result)

    def recording(svc, cap, rps, p, d):
        tick = evaluate(svc, cap, rps, p, d)
        if rps > 0:
            row = rows.setdefault((_size(d), tick.demand_tps > tick.decode_tps * (1 + 1e-9)), [0.0, 0.0, 0.0])
            row[0] += rps
            row[1] += rps * (1 - tick.attainment_ttft)
            row[2] += rps * (1 - tick.attainment_tbt)
        return tick

    world.evaluate, world.SimWorld.serve = recording, recording_serve
    try:
        setting = world.ours_mode(tune)[0]
        summary = world.run_heteroscale(score, tuned_on=tune).summary()
    finally:
        world.evaluate, world.SimWorld.serve = evaluate, serve
    total = sum(r[0] for r in rows.values()) or 1.0
    buckets = [{"routable_decode": size, "saturated": sat, "request_share": round(r[0] / total, 5),
                "ttft_miss_points": round(100 * r[1] / total, 3), "tbt_miss_points": round(100 * r[2] / total, 3)}
               for (size, sat), r in sorted(rows.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1]))]
    return {"scenario": Path(path).stem, "tuned_on": tune.name, "scored_on": score.name,
            "setting": world.setting_name(setting),
            "summary": {k: summary[k] for k in ("gpu_hours", "slo_attainment_ttft", "slo_attainment_tbt",
                                                "worst_service_attainment")},
            "buckets": buckets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite = ROOT / "bench" / "scenarios" / "suite"
    parser.add_argument("--scenario", nargs="+", default=[str(suite / "bursty.yaml")])
    args = parser.parse_args()
    began, out = time.perf_counter(), []
    for path in args.scenario:
        print(f"{Path(path).stem}: ours on the scoring day ...", file=sys.stderr, flush=True)
        out.append(measure(path))
        s = out[-1]
        print(f"{s['scenario']} ({s['setting']}): TTFT {s['summary']['slo_attainment_ttft']:.4f}, "
              f"TBT {s['summary']['slo_attainment_tbt']:.4f}")
        print(f"  {'routable decode':>15} {'saturated':>9} {'requests':>9} {'TTFT miss':>10} {'TBT miss':>9}")
        for b in s["buckets"]:
            print(f"  {b['routable_decode']:>15} {str(b['saturated']):>9} {b['request_share']:>9.4f} "
                  f"{b['ttft_miss_points']:>9.3f}p {b['tbt_miss_points']:>8.3f}p")
    path = write_result("miss_sources", {"wall_s": round(time.perf_counter() - began, 1), "scenarios": out})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
