"""Sim-to-real: replay a recorded `make demo` run through its simulated twin and compare (issue 20 part 7).

    python bench/scripts/sim_vs_live.py [RUN_DIR] [--service S] [--cluster C] [--out PATH]

RUN_DIR is a demo run (`runs/demo-<UTC>/`, written by `make demo`); the default is the recording kept in
`bench/results/live_demo/`. The twin (`bench.sim.twin`) runs the live controller's control cycle over the demo's
cluster and service with the CPU engine's calibrated step times and measured cold start, loaded with the run's
own requests. Writes `bench/results/sim_vs_live.json`: scale-event times, SLO attainment and instance-seconds
per role from both, and the goals (events within one control period, attainment within 2 points,
instance-seconds within 10 %) with every miss named. Exit status 0 either way: misses are results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RECORDED = ROOT / "bench" / "results" / "live_demo"


def main(argv: list[str] | None = None) -> int:
    from bench.results_io import write_result
    from common.config import load_cluster_spec, load_service_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default=str(RECORDED), help="a demo run (default: %(default)s)")
    p.add_argument("--service", default=str(ROOT / "examples" / "service-local.yaml"))
    p.add_argument("--cluster", default=str(ROOT / "examples" / "cluster-local.yaml"),
                   help="the cluster the run used (the recording: this default; `make demo` now: "
                        "examples/cluster-demo.yaml)")
    p.add_argument("--out", default=None, help="default bench/results/sim_vs_live.json")
    args = p.parse_args(argv)
    write_result("sim_vs_live", compare_run(args.run_dir, load_service_spec(args.service),
                                            load_cluster_spec(args.cluster)), args.out)
    return 0


def deployed_groups(service, cluster) -> list:
    """The spec's DGs with the GPU types `heteroscale deploy` resolves for them."""
    from dataclasses import replace

    from bench.sim.twin import cluster_nodes
    from common.vocab import Role
    from serving.deployment_groups import resolve_gpu_type

    nodes = cluster_nodes(cluster)
    return [replace(dg, prefill_gpu_type=resolve_gpu_type(nodes, service.affinity, dg.domain, Role.PREFILL,
                                                          service.roles.prefill, dg.name),
                    decode_gpu_type=resolve_gpu_type(nodes, service.affinity, dg.domain, Role.DECODE,
                                                     service.roles.decode, dg.name))
            for dg in service.deployment_groups]


def compare_run(run_dir, service, cluster) -> dict:
    """The twin of a recorded demo run (the live controller's cycle config, the deployed groups) against it."""
    from autoscaler.controller import HeteroScaleController
    from bench.sim import twin

    run = twin.LiveRun.load(run_dir)
    if "curated" in run.summary:  # the demo ran the controller on its profile's numbers, not the spec's
        from heteroscale_ray.autoscale_demo import curated

        service = curated(service, {"autoscaling": run.summary["curated"]}, run.replay.get("forecast_period_s"))
    calibration = json.loads(twin.CALIBRATION.read_text())
    startup_s = json.loads(twin.COLD_START.read_text())["cold_start_s"]
    entries, result = twin.replay(run, service, cluster, HeteroScaleController.cycle_config(service),
                                  deployed_groups(service, cluster), calibration, startup_s)
    return {"benchmark": "sim_vs_live", "live_run": str(Path(run_dir).resolve().relative_to(ROOT))
            if Path(run_dir).resolve().is_relative_to(ROOT) else str(run_dir),
            "twin": {"calibration": str(twin.CALIBRATION.relative_to(ROOT)), "startup_s": startup_s,
                     "control_period_s": run.replay["control_period_s"],
                     "signal_window_s": service.autoscaling.signal_window_s},
            **twin.compare(run, entries, result),
            "not_modelled": "two engines share each core live (the twin gives each a core); engine start-up "
                            "stealing CPU from serving engines; report-path delays; per-request variation"}


if __name__ == "__main__":
    sys.exit(main())
