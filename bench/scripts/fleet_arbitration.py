"""Many services, one fleet, in the simulator: paper-fleet under a GPU budget below its peak, with priority
classes, our one-cycle arbiter (budget charged in `place()`, whole-group preemption of lower priorities)
against per-service controllers without an arbiter and a static partition of the same budget.

Classes (by service family; the scenario's services carry none): interactive 8B chat `gold` (priority 2), 70B
chat `silver` (priority 1), RAG `bronze` (priority 0, best effort: `fleet_min_decode` 0, may be scaled to zero);
another scenario's services take the classes in turn by name.
Held out: our settings (curated) and the budget come from the tuning day, every score from the scoring day;
our policy runs its fixed ratio without the forecast in every variant (the comparison is the arbitration).
- `no_budget`: ours with the classes, no budget (the reference; its tuning-day peak sets the budget);
- `arbitrated`: ours, one cycle over every service with the budget and the classes;
- `uncoordinated`: one controller per service, no arbiter and no budget: each plans over the same view, so two
  may take the same free GPUs (`max_unheld_gpus`: GPUs the world could not give; it serves as if they existed)
  and the sum passes the budget;
- `static_partition`: each service fixed at its tuning-day peak (P, D) scaled to its share of the budget.
Per-DG scoring, per class: attainment (TTFT, TBT) and GPU-hours. Writes bench/results/fleet_arbitration.json.

    .venv/bin/python bench/scripts/fleet_arbitration.py      # ~15 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from bench.sim.arbitration import run_all  # noqa: E402
from bench.sim.days import tuning_and_scoring  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402

SCENARIO = ROOT / "bench" / "scenarios" / "paper-fleet.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--budget-share", type=float, default=0.8,
                        help="the budget as a share of ours' peak without a budget on the tuning day (default 0.8)")
    args = parser.parse_args()
    if not 0 < args.budget_share <= 1:
        parser.error(f"--budget-share ({args.budget_share}) must be in (0, 1]")
    tuning, scoring = tuning_and_scoring(load_scenario(args.scenario))
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    result = run_all(tuning, scoring, args.budget_share, progress=log)
    write_result("fleet_arbitration", {"benchmark": "fleet_arbitration", "scenario": Path(args.scenario).name,
                                       **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
