"""How far a request mix that moves through the day moves one decode instance's capacity (issue 22): a
diagnostic, on the scenario suite's mix-drift scenario by default (its findings: docs/design.md, "The day's
mix, as a whole-day profile sees it").

Ours sizes decode from decode tokens/s against one target per service, curated on the tuning day for the day's
average mix (`bench.sim.curation.stress_test`). Where the mix moves, the tokens/s one decode instance serves
within the TBT SLO moves with it (longer contexts: fewer sequences per step, slower steps). For each service
this reads, from the performance model the simulator scores with, the SLO-feasible decode tokens/s of one
instance in each window of the scoring day's mix (`Capacity.cap_decode_tps`), against the day's average mix;
and the decode instance-hours of the scoring day's demand (rate x mean output tokens) at each window's own
capacity against those at the day-average capacity and at the day's worst window's capacity. No policy runs:
the numbers bound what a target that follows the mix could change, not what a policy would get.

    .venv/bin/python bench/scripts/mix_capacity.py [--scenario bench/scenarios/suite/mix-drift.yaml]

Writes bench/results/mix_capacity.json; one line per service on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from bench.sim.days import tuning_and_scoring  # noqa: E402
from bench.sim.model import Capacity  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402

DEFAULT = ROOT / "bench" / "scenarios" / "suite" / "mix-drift.yaml"


def service_row(svc, duration_s: float, tick_s: float) -> dict:
    day_cap = Capacity.of(svc).cap_decode_tps  # the day's average mix: what the curated target is sized from
    caps = {}
    at_own = at_day = 0.0
    ticks = int(duration_s // tick_s)
    for i in range(ticks):
        t = i * tick_s
        phase, here = svc.phase_index(t), svc.at(t)
        if phase not in caps:
            caps[phase] = Capacity.of(here).cap_decode_tps
        demand = svc.shape.rate(t) * here.mean_output  # decode tokens/s asked
        at_own += demand / caps[phase] * tick_s / 3600
        at_day += demand / day_cap * tick_s / 3600
    worst = min(caps.values())
    at_worst = at_day * day_cap / worst
    return {"windows": len(caps), "decode_tps_per_instance_day_mix": round(day_cap, 1),
            "decode_tps_per_instance_min": round(worst, 1), "decode_tps_per_instance_max": round(max(caps.values()), 1),
            "decode_instance_hours_at_each_windows_capacity": round(at_own, 1),
            "decode_instance_hours_at_the_day_mix": round(at_day, 1),
            "decode_instance_hours_at_the_worst_window": round(at_worst, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(DEFAULT))
    parser.add_argument("--out", default=None, help="default: bench/results/mix_capacity.json")
    args = parser.parse_args()
    began = time.perf_counter()
    _, score = tuning_and_scoring(load_scenario(args.scenario))
    rows = {}
    for svc in score.services:
        rows[svc.name] = row = service_row(svc, score.duration_s, score.tick_s)
        print(f"{svc.name:<20} {row['windows']:>3} windows  decode tok/s per instance {row['decode_tps_per_instance_min']:>8,.0f}"
              f" .. {row['decode_tps_per_instance_max']:>8,.0f} (day mix {row['decode_tps_per_instance_day_mix']:,.0f})",
              file=sys.stderr)
    total = {k: round(sum(r[k] for r in rows.values()), 1) for k in (
        "decode_instance_hours_at_each_windows_capacity", "decode_instance_hours_at_the_day_mix",
        "decode_instance_hours_at_the_worst_window")}
    write_result("mix_capacity", {"benchmark": "mix_capacity", "scenario": Path(args.scenario).name,
                                  "scored_on": score.name, "wall_s": round(time.perf_counter() - began, 1),
                                  "total": total, "services": rows}, args.out)
    print(f"decode instance-hours: each window's capacity {total['decode_instance_hours_at_each_windows_capacity']:,.0f}, "
          f"the day's mix {total['decode_instance_hours_at_the_day_mix']:,.0f}, "
          f"the worst window {total['decode_instance_hours_at_the_worst_window']:,.0f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
