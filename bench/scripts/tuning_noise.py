"""How far one day's GPU-hour differences between settings carry to another day: the evidence for curation's
tie width (`bench.sim.model.TIE_GPU_HOURS`), measured on days that are not the scoring day.

For every suite scenario, the day before the tuning day and the tuning day itself: ours at its settings
without the forecast (fixed and adaptive ratio, each at its curated targets and at every headroom of
`bench.sim.world.HEADROOMS`; the adaptive one also at every prefill scale) and the HPA and SLA planner at
every point of their grids. For each pair of settings of one policy, the relative GPU-hour difference
(a - b) / b on each day; its change from one day to the other is how much of a difference that size is noise.

    .venv/bin/python bench/scripts/tuning_noise.py [--scenario bench/scenarios/suite/*.yaml] [--workers 2]

Writes bench/results/tuning_noise.json; one line per finished run on stderr.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from bench.sim.baselines import GRIDS, run_setting  # noqa: E402
from bench.sim.days import DaySpec, day_of  # noqa: E402
from bench.sim.model import attainment  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402
from bench.sim.world import HEADROOMS, PREFILL_SCALES, run_heteroscale  # noqa: E402

BASELINES = ("hpa_gpu_util", "sla_planner")


def ours_settings() -> list[dict]:
    out = []
    for adaptive in (False, True):
        out.append({"adaptive": adaptive, "predict": False, "headroom": None, "prefill": None})
        out += [{"adaptive": adaptive, "predict": False, "headroom": 1 / h, "prefill": None} for h in HEADROOMS]
    out += [{"adaptive": True, "predict": False, "headroom": None, "prefill": f} for f in PREFILL_SCALES]
    return out


def days(path: str) -> tuple[int, int]:
    spec = load_scenario(path).days or DaySpec()
    first, second = spec.tuning_day - 1, spec.tuning_day
    if spec.scoring_day in (first, second):
        raise ValueError(f"{path}: the scoring day ({spec.scoring_day}) is the tuning day or the one before it")
    return first, second


@functools.lru_cache(maxsize=4)
def _day(path: str, day: int):
    """A scenario's day, loaded once per worker process (its jobs come scenario by scenario)."""
    return day_of(load_scenario(path), day)


def one(job: tuple[str, int, str, int]) -> tuple[tuple[str, int, str, int], dict, float]:
    path, day, policy, index = job
    began = time.perf_counter()
    scenario = _day(path, day)
    if policy == "heteroscale":
        result = run_heteroscale(scenario, tuned_on=scenario, **ours_settings()[index])
    else:
        result = run_setting(policy, scenario, GRIDS[policy][index], scenario)
    s = result.summary()
    return job, {"gpu_hours": s["gpu_hours"], "attainment": attainment(s)}, time.perf_counter() - began


def pair_noise(runs: dict[int, list[dict]]) -> list[dict]:
    """Each pair of settings: the relative GPU-hour difference on each day and its change."""
    (d0, first), (d1, second) = sorted(runs.items())
    out = []
    for a, b in itertools.combinations(range(len(first)), 2):
        delta0 = first[a]["gpu_hours"] / first[b]["gpu_hours"] - 1
        delta1 = second[a]["gpu_hours"] / second[b]["gpu_hours"] - 1
        out.append({"pair": [a, b], "days": [d0, d1], "delta": [round(delta0, 5), round(delta1, 5)],
                    "change": round(abs(delta1 - delta0), 5)})
    return out


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"pairs": len(ordered), "median": round(statistics.median(ordered), 5), "p90": round(pick(0.9), 5),
            "max": round(ordered[-1], 5)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+",
                        default=sorted(str(p) for p in (ROOT / "bench" / "scenarios" / "suite").glob("*.yaml")))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    counts = {"heteroscale": len(ours_settings()), **{b: len(GRIDS[b]) for b in BASELINES}}
    day_pairs = {path: days(path) for path in args.scenario}
    jobs = [(path, day, policy, i) for path in args.scenario for day in day_pairs[path]
            for policy, n in counts.items() for i in range(n)]
    began, results = time.perf_counter(), {}
    with ProcessPoolExecutor(args.workers) as pool:
        for k, (job, point, spent) in enumerate(pool.map(one, jobs), 1):
            results[job] = point
            print(f"[{k}/{len(jobs)}] {Path(job[0]).stem} day {job[1]} {job[2]} #{job[3]} ({spent:.0f} s)",
                  file=sys.stderr, flush=True)
    scenarios, pooled = {}, {policy: [] for policy in counts}
    for path in args.scenario:
        name, per_policy = Path(path).stem, {}
        for policy, n in counts.items():
            runs = {day: [results[(path, day, policy, i)] for i in range(n)] for day in day_pairs[path]}
            pairs = pair_noise(runs)
            pooled[policy] += [p["change"] for p in pairs]
            per_policy[policy] = {"runs": {str(d): r for d, r in runs.items()}, "pairs": pairs,
                                  "change": quantiles([p["change"] for p in pairs])}
        scenarios[name] = per_policy
    summary = {policy: quantiles(values) for policy, values in pooled.items()}
    summary["all"] = quantiles([v for values in pooled.values() for v in values])
    for policy, q in summary.items():
        print(f"{policy:>13}: change of a pair's relative GPU-hour difference from one day to the next: "
              f"median {q['median']:.4f}, 90th percentile {q['p90']:.4f}, max {q['max']:.4f} ({q['pairs']} pairs)")
    settings = {"heteroscale": ours_settings(), **{b: list(GRIDS[b]) for b in BASELINES}}
    path = write_result("tuning_noise", {"wall_s": round(time.perf_counter() - began, 1), "settings": settings,
                                         "summary": summary, "scenarios": scenarios})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
