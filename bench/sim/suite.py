"""The scenario suite: every scenario of `bench/scenarios/suite/`, every policy tuned on the scenario's tuning
day and scored on its scoring day, scored per deployment group, each policy reported as one point and as a
front of GPU-hours against attainment.

Per scenario (`bench.sim.days.tuning_and_scoring` gives its two days):
- ours (`heteroscale`): each mode (`bench.sim.world.MODES`: fixed or adaptive ratio, with or without the
  forecast) curated on the tuning day (`bench.sim.curation`) and run there, and at each decode headroom of
  `bench.sim.world.HEADROOMS` (target = capacity / h, the curated ratio kept), then the best so far
  with its prefill at each of `bench.sim.world.PREFILL_SCALES` x the curated, there too; the setting the tuning
  day chooses (`bench.sim.world.ours_mode`'s rule) is scored on the scoring day, and so are its mode at the
  curated targets, the fixed ratio at its curated targets (the paper's policy, the reference issue 22's
  mix-drift goal names), its mode over the headrooms and it over the prefill scales: ours' front holds every
  point of ours scored;
- each baseline: every setting of its grid (`bench.sim.baselines.GRIDS`) on the tuning day picks its point (the
  cheapest meeting the 99 % goal, near-ties to the best attainment: our curation's rule, `choose`); every
  setting on the scoring day makes its front;
- `static_peak`: sized for the tuning day's peak; `oracle`: per tick the fewest instances meeting a per-tick
  goal (its front sweeps that goal), no start-up: a bound only for policies that meet the per-tick goal;
- `gpu_hours_at_heteroscale_attainment`: the GPU-hours a policy's front needs at ours' scoring-day attainment
  (linear between the two front points around it; null where the front never reaches it);
  `gpu_hours_at_goal`: the same at the goal (`attainment_goal`, 0.99), ours' front included: where ours'
  curated point lands above the goal (or a front never reaches ours' attainment), the fronts still compare.
Work runs in `workers` processes, one scenario per process at a time (its runs share the scenario's capacities
and memos: a third less work than spreading them), biggest first; 1: in this process. Progress goes to
`progress`, one line per run to stderr.
"""

from __future__ import annotations

import gc
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from bench.sim.baselines import GRIDS, HEADROOM_GRID, run_oracle, run_setting, run_static_peak
from bench.sim.days import tuning_and_scoring
from bench.sim.model import TTFT_GOAL, Scenario, attainment, choose
from bench.sim.run import quiet_collector
from bench.sim.scenarios import load_scenario
from bench.sim.world import (CURATION_STAGES, HEADROOMS, MODES, PREFILL_SCALES, curated, headroom_settings,
                             mode_settings, prefill_settings, run_heteroscale, setting_name)

SUITE_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "suite"
ORACLE_GOALS = (0.95, 0.98, 0.99, 0.995, 0.999)
FIXED = curated(MODES[0])  # the paper's mode (fixed ratio, no forecast) at its curated targets
KEYS = ("gpu_hours", "slo_attainment_ttft", "slo_attainment_tbt", "dg_ratio_violations", "num_scale_actions",
        "avg_gpu_util", "peak_allocated_gpus", "unplaced_requests", "worst_service_attainment")

_SCENARIOS: dict[str, tuple[Scenario, Scenario, Scenario]] = {}


def _days(path: str) -> tuple[Scenario, Scenario, Scenario]:
    """The scenario file and its tuning and scoring days, kept (with the capacities and memos every run over
    them shares) until another scenario is loaded: one scenario's memos take ~2 GB."""
    if path not in _SCENARIOS:
        _SCENARIOS.clear()
        scenario = load_scenario(path)
        _SCENARIOS[path] = (scenario, *tuning_and_scoring(scenario))
    return _SCENARIOS[path]


def _key(setting):
    """A setting as a hashable task part (grid settings are dicts)."""
    return tuple(sorted(setting.items())) if isinstance(setting, dict) else setting


def _run(task: tuple) -> tuple[dict, float]:
    """One simulation run: (summary, seconds)."""
    path, policy, day, key = task
    setting = dict(key) if isinstance(key, tuple) else key
    began = time.perf_counter()
    _, tune, score = _days(path)
    scenario = tune if day == "tune" else score
    if policy == "heteroscale":
        result = run_heteroscale(scenario, tuned_on=tune, **setting)
    elif policy == "oracle":
        result = run_oracle(scenario, setting)
    elif policy == "static_peak":
        result = run_static_peak(scenario, tune)
    else:
        result = run_setting(policy, scenario, setting, tune if day == "score" else None)
    return {k: v for k, v in result.summary().items() if k in KEYS}, time.perf_counter() - began


def _run_scenario(job: tuple[str, bool]) -> tuple[str, dict, float]:
    """Every run of one scenario in one process (a worker), so they share its capacities and memos (the same
    rates at the same ticks): (path, its report, seconds). With `show`, one line per run on stderr. Ours'
    scoring-day runs follow its tuning-day runs (the mode they choose)."""
    path, show = job
    began, done = time.perf_counter(), {}

    def run(tasks):
        for task in tasks:
            done[task], spent = _run(task)
            # What the runs keep (the scenario's capacities and memos, ~2 GB of small objects) needs no collector:
            # out of its sight, its full passes no longer walk it (a fifth of a run's time). Its one reference
            # cycle (a service and its capacities) is broken when the scenario is done, below.
            gc.freeze()
            if show:
                print(f"  {Path(path).stem}: {task[1]} on the {task[2]} day ({spent:.1f} s)", file=sys.stderr,
                      flush=True)

    run(_tune_tasks(path))
    for stage in CURATION_STAGES:
        run([(path, "heteroscale", "tune", _key(s)) for s in stage(_chosen(path, done))])
    run(_score_tasks(path, _chosen(path, done)))
    report = _scenario_report(path, done)
    for day in _SCENARIOS.pop(path):
        for svc in day.services:  # a service and its capacities refer to each other: let the memos go at once
            svc.__dict__.pop("capacities", None)
    gc.unfreeze()
    gc.collect()
    return path, report, time.perf_counter() - began


def _tune_tasks(path: str) -> list[tuple]:
    """Ours in every mode and headroom on the tuning day, then every other run that does not wait on ours'
    choice."""
    tasks = [(path, "heteroscale", "tune", _key(setting)) for mode in MODES for setting in mode_settings(mode)]
    tasks += [(path, "oracle", "score", g) for g in ORACLE_GOALS] + [(path, "static_peak", "score", None)]
    for name, grid in GRIDS.items():
        for setting in grid:
            if len(grid) > 1:
                tasks.append((path, name, "tune", _key(setting)))
            tasks.append((path, name, "score", _key(setting)))
    return tasks


def _ours_scored(chosen: dict) -> list[dict]:
    """Ours' settings scored on the scoring day when the tuning day chose `chosen`: it first, its mode at the
    curated targets and over the headrooms, it over the prefill scales, and the fixed ratio (the paper's mode)
    at its curated targets."""
    settings = [chosen, curated(chosen), *headroom_settings(chosen), *prefill_settings(chosen | {"prefill": None}),
                FIXED]
    return [s for i, s in enumerate(settings) if s not in settings[:i]]


def _score_tasks(path: str, mode: dict) -> list[tuple]:
    return [(path, "heteroscale", "score", _key(setting)) for setting in _ours_scored(mode)]


def _tried(path: str, done: dict) -> list[dict]:
    """Ours' settings run on the tuning day so far: the modes, then the best over the headrooms, then the best
    over the prefill scales."""
    return [{"attainment": attainment(s), "gpu_hours": s["gpu_hours"], "setting": dict(task[3])}
            for task, s in done.items() if task[:3] == (path, "heteroscale", "tune")]


def _chosen(path: str, done: dict) -> dict:
    """Ours' setting as the tuning day chooses it (`bench.sim.world.ours_mode`'s rule): of what ran there."""
    return choose(_tried(path, done))["setting"]


def _num_runs(path: str) -> int:
    """The runs of one scenario at most (fewer where the chosen setting is one of the others scored)."""
    return len(_tune_tasks(path)) + 2 * (len(HEADROOMS) + len(PREFILL_SCALES)) + 3


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both attainment (higher) and GPU-hours (lower), by attainment."""
    ordered = sorted(points, key=lambda p: (p["gpu_hours"], -p["attainment"]))
    front, best = [], -1.0
    for p in ordered:
        if p["attainment"] > best:
            front.append(p)
            best = p["attainment"]
    return sorted(front, key=lambda p: p["attainment"])


def gpu_hours_at(front: list[dict], target: float) -> float | None:
    """The GPU-hours a front needs at `target` attainment: linear between the front's points around it, the
    cheapest point at or above it where none is below; None where no point reaches it."""
    above = [p for p in front if p["attainment"] >= target]
    if not above:
        return None
    hi = min(above, key=lambda p: p["gpu_hours"])
    below = [p for p in front if p["attainment"] < target and p["gpu_hours"] < hi["gpu_hours"]]
    if not below:
        return round(hi["gpu_hours"], 1)
    lo = max(below, key=lambda p: p["attainment"])
    share = (target - lo["attainment"]) / (hi["attainment"] - lo["attainment"])
    return round(lo["gpu_hours"] + share * (hi["gpu_hours"] - lo["gpu_hours"]), 1)


def _scenario_report(path: str, done: dict[tuple, dict]) -> dict:
    scenario, tune, score = _days(path)

    def point(summary: dict, setting) -> dict:
        return {"attainment": attainment(summary), "gpu_hours": summary["gpu_hours"], "setting": setting}

    policies: dict[str, dict] = {}
    tried, chosen = _tried(path, done), _chosen(path, done)
    scored = [(m, done[(path, "heteroscale", "score", _key(m))]) for m in _ours_scored(chosen)]
    ours = scored[0][1]
    policies["heteroscale"] = {
        **ours, "setting": f"curated on the tuning day ({setting_name(chosen)})",
        "mode": {"chosen": setting_name(chosen),
                 "tuning_day": {setting_name(t["setting"]): {"gpu_hours": t["gpu_hours"],
                                                             "attainment": t["attainment"]} for t in tried},
                 "scoring_day_curated": {setting_name(m): point(s, None) for m, s in scored
                                         if m == chosen or m == curated(m)}},
        # every point of ours scored: the chosen mode over its headrooms, the chosen over its prefill scales, and
        # the fixed ratio at its curated targets
        "front": pareto([point(s, m) for m, s in scored])}
    oracle = [point(done[(path, "oracle", "score", g)], {"per_tick_goal": g}) for g in ORACLE_GOALS]
    policies["oracle"] = {**done[(path, "oracle", "score", TTFT_GOAL)], "setting": {"per_tick_goal": TTFT_GOAL},
                          "front": pareto(oracle)}
    static = done[(path, "static_peak", "score", None)]
    policies["static_peak"] = {**static, "setting": "the tuning day's peak", "front": [point(static, None)]}
    for name, grid in GRIDS.items():
        scored = [(setting, done[(path, name, "score", _key(setting))]) for setting in grid]
        if len(grid) > 1:
            chosen = choose([point(done[(path, name, "tune", _key(setting))], setting) for setting in grid])["setting"]
        else:
            chosen = grid[0]
        summary = next(s for st, s in scored if st == chosen)
        policies[name] = {**summary, "setting": chosen, "front": pareto([point(s, st) for st, s in scored])}
    target = attainment(ours)
    for name, p in policies.items():
        p["gpu_hours_at_heteroscale_attainment"] = gpu_hours_at(p["front"], target)
        p["gpu_hours_at_goal"] = gpu_hours_at(p["front"], TTFT_GOAL)
    return {"tuned_on": tune.name, "scored_on": score.name,
            "stresses": _stresses(path),
            "fleet": {"gpus": scenario.fleet_gpus, "services": len(scenario.services),
                      "duration_s": scenario.duration_s, "tick_s": scenario.tick_s},
            "peak_allocated_gpus_heteroscale": ours["peak_allocated_gpus"],
            "heteroscale_attainment": target, "policies": policies}


def _stresses(path: str) -> str:
    """The scenario file's first comment line: what it stresses."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run_suite(paths: list[str] | None = None, workers: int = 2, progress=None) -> dict:
    """Run every scenario of the suite (default: `bench/scenarios/suite/*.yaml`); returns suite.json's content."""
    paths = [str(p) for p in (paths or sorted(SUITE_DIR.glob("*.yaml")))]
    if not paths:
        raise ValueError(f"no scenario files in {SUITE_DIR}")
    size = {}
    for path in paths:  # every file loads (and names its errors) before anything runs
        scenario = _days(path)[0]
        size[path] = len(scenario.services) * (2 if any(s.phases for s in scenario.services) else 1)
    _SCENARIOS.clear()
    order = sorted(paths, key=lambda p: -size[p])  # the biggest first, so the processes end together
    began, scenarios, seconds = time.perf_counter(), {}, {}
    if progress:
        progress(f"suite: {len(paths)} scenarios, {sum(_num_runs(p) for p in paths)} simulation runs at most on "
                 f"{workers} processes (one scenario per process at a time)")
    jobs = [(p, progress is not None) for p in order]
    workers_pool = ProcessPoolExecutor(workers, initializer=quiet_collector) if workers > 1 else nullcontext()
    with workers_pool as pool:
        for i, (path, report, spent) in enumerate((pool.map if pool else map)(_run_scenario, jobs), 1):
            scenarios[path], seconds[path] = report, spent
            if progress:
                progress(f"[{i}/{len(paths)}] {Path(path).stem} done ({spent:.0f} s; "
                         f"{time.perf_counter() - began:.0f} s in all)")
    return {"wall_s": round(time.perf_counter() - began, 1), "workers": workers, "attainment_goal": TTFT_GOAL,
            "headroom_grid": list(HEADROOM_GRID),
            "scenarios": {Path(p).stem: {**scenarios[p], "cpu_s": round(seconds[p], 1)} for p in paths}}


def table(report: dict) -> str:
    """One row per scenario and policy: GPU-hours, attainment, GPU-hours at ours' attainment and vs ours, the
    same at the goal (each front's, against ours' front's)."""
    lines = [f"{'scenario':<17} {'policy':<18} {'GPU-h':>10} {'TTFT':>7} {'TBT':>7} {'GPU-h at ours':>14} "
             f"{'vs ours':>8} {'GPU-h at goal':>14} {'vs ours':>8} {'DG viol.':>8}"]

    def at_and_ratio(at: float | None, ours: float | None) -> str:
        return f"{'-' if at is None else f'{at:,.0f}':>14} {'-' if at is None or not ours else f'{at / ours:.3f}':>8}"

    for name, sc in report["scenarios"].items():
        ours = sc["policies"]["heteroscale"]
        for policy, p in sc["policies"].items():
            lines.append(f"{name:<17} {policy:<18} {p['gpu_hours']:>10,.0f} {p['slo_attainment_ttft']:>7.4f} "
                         f"{p['slo_attainment_tbt']:>7.4f} "
                         f"{at_and_ratio(p['gpu_hours_at_heteroscale_attainment'], ours['gpu_hours'])} "
                         f"{at_and_ratio(p['gpu_hours_at_goal'], ours['gpu_hours_at_goal'])} "
                         f"{'-' if p['dg_ratio_violations'] is None else p['dg_ratio_violations']:>8}")
    return "\n".join(lines)


def write_plots(report: dict, out_dir) -> list[str]:
    """One PNG per scenario: every policy's front (GPU-hours against attainment) and its tuned point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, sc in report["scenarios"].items():
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for policy, p in sc["policies"].items():
            front = p["front"]
            line, = ax.plot([q["gpu_hours"] for q in front], [q["attainment"] for q in front], marker=".",
                            label=policy)
            ax.scatter([p["gpu_hours"]], [min(p["slo_attainment_ttft"], p["slo_attainment_tbt"])], marker="*",
                       s=120, color=line.get_color(), zorder=5)
        ax.axhline(sc["heteroscale_attainment"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("GPU-hours on the scoring day")
        ax.set_ylabel("SLO attainment, per DG (min of TTFT, TBT)")
        ax.set_ylim(max(0.8, ax.get_ylim()[0]), 1.001)
        ax.set_title(f"{name}: fronts (lines) and settings tuned on {sc['tuned_on']} (stars)", fontsize="small")
        ax.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        path = Path(out_dir) / f"front_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(str(path))
    return paths
