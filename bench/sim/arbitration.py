"""Many services, one fleet, in the simulator (issue: fleet arbitration): priority classes over a scenario's
services, our cycle with a GPU budget and the classes, the same without an arbiter, and a static partition of the
budget; per-class scoring (`bench/scripts/fleet_arbitration.py` runs it on paper-fleet)."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

from autoscaler.cycle import CycleConfig
from autoscaler.model import FleetConfig
from bench.sim.baselines import run_counts_policy
from bench.sim.model import PolicyResult, Scenario
from bench.sim.world import cycle_config, run_config

CLASSES = {"gold": 2, "silver": 1, "bronze": 0}


def classes_of(names) -> dict[str, str]:
    """Service -> class: paper-fleet's families, else in turn by name."""
    names = sorted(names)
    if all(n.startswith(("chat-", "rag-")) for n in names):
        return {n: "bronze" if n.startswith("rag") else "silver" if n.startswith("chat-70b") else "gold"
                for n in names}
    return {n: list(CLASSES)[i % len(CLASSES)] for i, n in enumerate(names)}


def with_classes(config: CycleConfig, budget: int | None) -> CycleConfig:
    """The configuration with each service's class priority (bronze: best effort, floor 0) and the budget."""
    policies, shapes = {}, {}
    of = classes_of(config.fleet.services)
    for name, policy in config.fleet.services.items():
        cls = of[name]
        policies[name] = replace(policy, priority=CLASSES[cls], fleet_min_decode=0 if cls == "bronze" else None)
        shapes[name] = replace(config.shapes[name], priority=CLASSES[cls])
    return CycleConfig(FleetConfig(policies, gpu_budget=budget), shapes, config.scheduler)


def static_partition(scoring: Scenario, tuning: Scenario, budget: int) -> PolicyResult:
    """Each service fixed at its tuning-day peak scaled by budget / the peaks' sum (at least 1P+1D)."""
    peaks, tp = tuning.peak_counts, scoring.tp
    total = sum(p * tp[n][0] + d * tp[n][1] for n, (p, d) in peaks.items())
    f = budget / total
    counts = {n: (max(1, math.floor(p * f)), max(1, math.floor(d * f))) for n, (p, d) in peaks.items()}
    return run_counts_policy(scoring, lambda svc, cap, t: counts[svc.name])


def report(result: PolicyResult, budget: int, tick_s: float) -> dict:
    s = result.summary()
    alloc = [row[0] for row in result.per_tick.values()]
    classes, of = {}, classes_of(result.by_service)
    for cls in CLASSES:
        rows = [r for n, r in result.by_service.items() if of[n] == cls]
        requests = sum(r[1] for r in rows)
        classes[cls] = {"services": len(rows), "gpu_hours": round(sum(r[0] for r in rows), 1),
                        "slo_attainment_ttft": round(sum(r[2] for r in rows) / max(requests, 1e-12), 4),
                        "slo_attainment_tbt": round(sum(r[3] for r in rows) / max(requests, 1e-12), 4)}
    return {"gpu_hours": s["gpu_hours"], "peak_allocated_gpus": s["peak_allocated_gpus"],
            "budget_exceeded": max(alloc, default=0) > budget,
            "gpu_hours_over_budget": round(sum(max(0.0, a - budget) for a in alloc) * tick_s / 3600, 1),
            "max_unheld_gpus": result.max_unheld_gpus, "num_preemptions": result.num_preemptions,
            "num_budget_cuts": result.num_budget_cuts,
            "slo_attainment_ttft": s["slo_attainment_ttft"], "slo_attainment_tbt": s["slo_attainment_tbt"],
            "classes": classes}


def run_all(tuning: Scenario, scoring: Scenario, budget_share: float = 0.8,
            progress: Callable[[str], None] = lambda m: None) -> dict:
    """The budget from ours' peak without a budget on the tuning day (`budget_share` of it), then every variant on
    the scoring day (settings curated on the tuning day; our fixed ratio, no forecast, in every variant)."""
    if not 0 < budget_share <= 1:
        raise ValueError(f"budget_share ({budget_share}) must be in (0, 1]")
    plain = lambda day: cycle_config(day, tuning, adaptive=False, predict=False)  # noqa: E731
    progress(f"curating on {tuning.name} and sizing the budget from ours' peak without a budget there ...")
    peak = run_config(tuning, with_classes(plain(tuning), None)).summary()["peak_allocated_gpus"]
    budget = int(budget_share * peak)
    progress(f"budget {budget} GPUs ({budget_share:g} x {peak}); scoring on {scoring.name}")
    runs = {
        "no_budget": lambda: run_config(scoring, with_classes(plain(scoring), None)),
        "arbitrated": lambda: run_config(scoring, with_classes(plain(scoring), budget)),
        "uncoordinated": lambda: run_config(scoring, with_classes(plain(scoring), None), uncoordinated=True),
        "static_partition": lambda: static_partition(scoring, tuning, budget),
    }
    out = {}
    for name, run in runs.items():
        start = time.perf_counter()
        progress(f"{name} ...")
        out[name] = {**report(run(), budget, scoring.tick_s), "wall_s": round(time.perf_counter() - start, 1)}
        progress(f"  {name}: {out[name]['gpu_hours']:.0f} GPU-h, peak {out[name]['peak_allocated_gpus']} GPUs, "
                 + ", ".join(f"{c} {v['slo_attainment_ttft']:.4f}/{v['slo_attainment_tbt']:.4f}"
                             for c, v in out[name]["classes"].items()))
    return {"tuning_day": tuning.name, "scoring_day": scoring.name, "budget_share": budget_share,
            "no_budget_tuning_peak_gpus": peak, "budget_gpus": budget, "classes": dict(CLASSES),
            "class_of": classes_of(s.name for s in scoring.services), "variants": out}
