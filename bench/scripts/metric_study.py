"""The paper's metric study over a day (issue 22): which signal sizes which role, now that the model separates
them (request mix and prefix-cache hits that move over the day, utilization from kernel time per step).

For every scenario of the suite: each service's target for each candidate signal (its value per needed
instance) comes from the tuning day; on the scoring day, the size that target gives is compared with what the
role needs (`bench.sim.study.signal_quality`). Throughput signals size proportionally; a utilization target is
read where HPA would settle (the size whose utilization first falls to the target).

    .venv/bin/python bench/scripts/metric_study.py [--stride 10] [--out bench/results/metric_study.json]

About 2 minutes on 2 cores; one line per scenario on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.results_io import write_result  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402
from bench.sim.study import signal_quality  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stride", type=int, default=10, help="read every Nth tick of the day")
    p.add_argument("--out", default=None, help="default bench/results/metric_study.json")
    args = p.parse_args(argv)
    if args.stride < 1:
        p.error(f"--stride ({args.stride}) must be >= 1")
    started, out = time.monotonic(), {}
    for path in sorted((ROOT / "bench" / "scenarios" / "suite").glob("*.yaml")):
        t0 = time.monotonic()
        out[path.stem] = signal_quality(load_scenario(path), stride=args.stride)
        print(f"{path.stem}: {time.monotonic() - t0:.0f}s", file=sys.stderr)
    write_result("metric_study", {"benchmark": "metric_study", "wall_s": round(time.monotonic() - started, 1),
                                  "definition": signal_quality.__doc__.split("\n\n")[0].replace("\n   ", ""),
                                  "scenarios": out}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
