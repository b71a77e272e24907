"""An experiment for issue 22: the simulated ingress routing a service's requests over its deployment groups by
both roles' capacity instead of by decode alone, for ours on every suite scenario's scoring day.

The live ingress (and the simulator's default, `bench.sim.world.ROUTING = "decode"`) weights each DG by its
routable decode replicas, so a DG in the lower part of the ratio band (prefill down to ceil((D-1) r)) gets its
decode's share of requests with less than its share of prefill: `bench/scripts/dg_prefill_misses.py` found 94 %
of ours' TTFT misses there. Rule "both" weights each DG by the smaller of its share of the service's routable
decode and of its routable prefill (normalized). Only the router differs between the two runs: ours in the
mode each scenario's tuning day chose under the live rule (read from bench/results/suite/suite.json), curated on the tuning day, scored on the scoring day, per DG; the forecast's history is rebuilt under each rule.
What it does not show: the mode choice redone under the new rule, the baselines' fronts (they place no DGs and
split requests evenly, so the rule does not touch them), or the live ingress running it.

    .venv/bin/python bench/scripts/route_both_roles.py     # ~3 min on two cores

Writes bench/results/route_both_roles.json.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402

SUITE = ROOT / "bench" / "scenarios" / "suite"
SUITE_JSON = ROOT / "bench" / "results" / "suite" / "suite.json"  # the live rule's suite run: modes and fronts
KEYS = ("gpu_hours", "slo_attainment_ttft", "slo_attainment_tbt", "dg_ratio_violations", "num_scale_actions")


def run(job: tuple[str, dict, str]) -> tuple[str, str, dict]:
    import bench.sim.world as world
    from bench.sim.days import tuning_and_scoring
    from bench.sim.scenarios import load_scenario

    name, mode, routing = job
    world.ROUTING = routing
    world._HISTORY.clear()  # the forecast's history comes from a run under the same rule
    tune, score = tuning_and_scoring(load_scenario(SUITE / f"{name}.yaml"))
    summary = world.run_heteroscale(score, tuned_on=tune, **mode).summary()
    return name, routing, {k: summary[k] for k in KEYS}


def main() -> int:
    from bench.sim.suite import gpu_hours_at
    from bench.sim.world import MODES, mode_name

    suite = json.loads(SUITE_JSON.read_text())["scenarios"]
    modes = {name: next(m for m in MODES if mode_name(m) == sc["policies"]["heteroscale"]["mode"]["chosen"])
             for name, sc in suite.items()}
    jobs = [(name, mode, routing) for name, mode in modes.items() for routing in ("decode", "both")]
    out: dict[str, dict] = {name: {} for name in modes}
    with ProcessPoolExecutor(2, max_tasks_per_child=1) as pool:
        for name, routing, summary in pool.map(run, jobs):
            out[name][routing] = summary
            print(f"{name:<18} {routing:<7} {summary['gpu_hours']:>10,.0f} GPU-h  "
                  f"TTFT {summary['slo_attainment_ttft']:.4f}"
                  f"  TBT {summary['slo_attainment_tbt']:.4f}", flush=True)
    for name, row in out.items():
        d, b = row["decode"], row["both"]
        row["gpu_hours_both_over_decode"] = round(b["gpu_hours"] / d["gpu_hours"], 4)
        row["attainment_decode"] = min(d["slo_attainment_ttft"], d["slo_attainment_tbt"])
        row["attainment_both"] = min(b["slo_attainment_ttft"], b["slo_attainment_tbt"])
        # what each baseline's front (suite.json: the same scoring day; the rule does not touch baselines)
        # needs at the attainment ours reaches under rule "both", over ours' GPU-hours there (> 1: ours cheaper)
        row["baselines_at_attainment_both_over_ours"] = {
            policy: None if at is None else round(at / b["gpu_hours"], 3)
            for policy, p in suite[name]["policies"].items() if policy != "heteroscale"
            for at in [gpu_hours_at(p["front"], row["attainment_both"])]}
        print(f"{name:<18} baselines' fronts at {row['attainment_both']:.4f} over ours: "
              f"{row['baselines_at_attainment_both_over_ours']}", flush=True)
    write_result("route_both_roles", {"modes": modes, "scenarios": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
