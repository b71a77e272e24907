"""Attainment against replica start-up (issue 22): ours without and with the start-up-aware forecast (and burst
path), and the reactive baselines, on one scenario with every replica's start-up set to 60 ... 300 s.

Held out like the suite: every setting (ours' curation, each baseline's knob chosen on its grid by the suite's
rule) comes from the tuning day at that start-up; everything is scored per DG on the scoring day.

    .venv/bin/python bench/scripts/startup_sweep.py [--scenario bench/scenarios/suite/smooth-diurnal.yaml]
        [--startups 60,120,180,240,300] [--workers 2] [--out bench/results/startup_sweep.json]

Writes the JSON and `startup_sweep.png` beside it; one line per finished start-up on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.baselines import run_setting  # noqa: E402
from bench.sim.days import tuning_and_scoring  # noqa: E402
from bench.sim.model import attainment  # noqa: E402
from bench.sim.run import tune_on  # noqa: E402
from bench.sim.scenarios import load_scenario  # noqa: E402
from bench.sim.world import run_heteroscale  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OURS = {"heteroscale": {"adaptive": False, "predict": False},
        "heteroscale+forecast": {"adaptive": False, "predict": True}}
BASELINES = ("sla_planner", "hpa_gpu_util", "periodic")


def _point(result) -> dict:
    s = result.summary()
    return {"gpu_hours": s["gpu_hours"], "slo_attainment_ttft": s["slo_attainment_ttft"],
            "slo_attainment_tbt": s["slo_attainment_tbt"], "attainment": attainment(s),
            "num_scale_actions": s["num_scale_actions"]}


def one_startup(job: tuple[str, float]) -> tuple[float, dict, float]:
    path, startup = job
    began = time.perf_counter()
    base = load_scenario(path)
    base = replace(base, name=f"{base.name}-startup{int(startup)}", startup_s=startup,
                   services=tuple(replace(s, startup_prefill_s=None, startup_decode_s=None) for s in base.services))
    tune, score = tuning_and_scoring(base)
    out = {name: _point(run_heteroscale(score, tuned_on=tune, **mode)) for name, mode in OURS.items()}
    for name in BASELINES:
        setting, _ = tune_on(tune, name)
        out[name] = {**_point(run_setting(name, score, setting, tune)), "setting": setting}
    return startup, out, time.perf_counter() - began


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    startups = sorted(report["startups"], key=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in [*OURS, *BASELINES]:
        ax.plot([float(s) for s in startups], [report["startups"][s][policy]["attainment"] for s in startups],
                marker="o", label=policy)
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("replica start-up (s)")
    ax.set_ylabel("per-DG SLO attainment (min of TTFT, TBT)")
    ax.set_title(report["scenario"])
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default=str(ROOT / "bench/scenarios/suite/smooth-diurnal.yaml"))
    ap.add_argument("--startups", default="60,120,180,240,300")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/startup_sweep.json"))
    args = ap.parse_args()
    try:
        startups = [float(x) for x in args.startups.split(",")]
    except ValueError:
        print(f"error: --startups {args.startups!r}: give seconds separated by commas, e.g. 60,120,180", file=sys.stderr)
        return 2
    if not startups or any(s < 0 for s in startups):
        print(f"error: --startups {args.startups!r}: every start-up must be >= 0 s", file=sys.stderr)
        return 2
    began, results = time.perf_counter(), {}
    jobs = [(args.scenario, s) for s in startups]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for startup, out, spent in pool.map(one_startup, jobs):
            results[str(int(startup))] = out
            print(f"start-up {startup:.0f} s done ({spent:.0f} s): " + ", ".join(
                f"{k} {v['attainment']:.4f}" for k, v in out.items()), file=sys.stderr, flush=True)
    report = {"scenario": Path(args.scenario).stem, "wall_s": round(time.perf_counter() - began, 1),
              "held_out": "settings from the tuning day at each start-up, scored on the scoring day, per DG",
              "startups": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
