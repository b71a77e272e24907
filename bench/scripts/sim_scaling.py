"""How the fleet simulator's wall time grows with the fleet: paper-fleet scaled to about 1k, 10k and 50k GPUs
allocated at the daily peak (every service's arrival rates and the number of S2 domains times the same
factor), each policy timed on its own (ours includes its curation). Writes bench/results/sim_scaling.json.

Usage: python bench/scripts/sim_scaling.py [--factors 0.1,1,5] [--policies heteroscale,oracle,...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from bench.sim.curation import curate  # noqa: E402
from bench.sim.run import POLICIES  # noqa: E402
from bench.sim.scenarios import scenario_from_dict  # noqa: E402

SCENARIO = ROOT / "bench" / "scenarios" / "paper-fleet.yaml"


def scaled(data: dict, factor: float) -> dict:
    out = copy.deepcopy(data)
    out["name"] = f"{data['name']}-x{factor:g}"
    topo = out["topology"]["generator"]
    topo["s2"] = max(1, round(topo["s2"] * factor))
    for spec in out["services"]["classes"]:
        spec["mean_rps"] = [v * factor for v in spec["mean_rps"]]
    return out


def main() -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="0.1,1,5")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    base = yaml.safe_load(SCENARIO.read_text())
    rows = []
    for factor in (float(f) for f in args.factors.split(",")):
        scenario = scenario_from_dict(scaled(base, factor), SCENARIO.parent, SCENARIO)
        row = {"factor": factor, "fleet_gpus": scenario.fleet_gpus, "services": len(scenario.services),
               "ticks": int(scenario.duration_s // scenario.tick_s), "policies": {}}
        for name in args.policies.split(","):
            print(f"x{factor:g} ({scenario.fleet_gpus} GPUs): {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            if name == "heteroscale":
                curate(scenario)
                row["curation_wall_s"] = round(time.perf_counter() - start, 2)
            result = POLICIES[name](scenario)
            s = result.summary()
            row["policies"][name] = {"wall_s": round(time.perf_counter() - start, 2),
                                     "peak_allocated_gpus": s["peak_allocated_gpus"], "gpu_hours": s["gpu_hours"],
                                     "attainment": min(s["slo_attainment_ttft"], s["slo_attainment_tbt"])}
        row["wall_s_all_policies"] = round(sum(p["wall_s"] for p in row["policies"].values()), 2)
        row["peak_allocated_gpus"] = max(p["peak_allocated_gpus"] for p in row["policies"].values())
        print(f"x{factor:g}: peak {row['peak_allocated_gpus']} GPUs allocated, all policies "
              f"{row['wall_s_all_policies']} s", file=sys.stderr)
        rows.append(row)
    write_result("sim_scaling", {"scenario": str(SCENARIO.relative_to(ROOT)), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
