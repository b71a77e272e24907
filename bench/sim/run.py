"""Run a scenario under several policies: `summary.json` (with the issue's goals as measured numbers) and plots."""

from __future__ import annotations

import gc
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Sequence

from bench.sim.baselines import GRIDS, run_oracle, run_setting, run_static_peak
from bench.sim.curation import CANDIDATES, DECODE_CANDIDATES, candidate_runs, curate, keep_runs
from bench.sim.days import tuning_and_scoring
from bench.sim.model import TTFT_GOAL, Capacity, PolicyResult, Scenario, attainment, choose
from bench.sim.world import (CURATION_STAGES, carry_history, curated, kept_history, mode_name, mode_settings,
                             modes_to_try, run_heteroscale, setting_name)


def _baseline(name: str):
    return lambda scenario, tuned_on=None: run_setting(name, scenario, GRIDS[name][0], tuned_on)


# name -> run(scored_on, tuned_on=None): settings, bounds and forecasts come from `tuned_on` (default: the same)
POLICIES = {"heteroscale": lambda scenario, tuned_on=None: run_heteroscale(scenario, tuned_on=tuned_on),
            **{name: _baseline(name) for name in ("hpa_gpu_util", "serve_queue", "serve_llm_default", "periodic",
                                                  "sla_planner")},
            "static_peak": lambda scenario, tuned_on=None: run_static_peak(scenario, tuned_on),
            "oracle": lambda scenario, tuned_on=None: run_oracle(scenario)}


class _InProcess:
    """`submit` runs the job at once, here (one worker: no processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def submit(fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future


def tune_on(tuning_day: Scenario, name: str, goal: float = TTFT_GOAL) -> tuple[dict, list[dict]]:
    """A baseline's setting chosen on the tuning day: the cheapest of its grid meeting `goal` (near-ties to
    the best attainment; else the best attainment), the same rule our curation follows (`choose`). Returns
    (setting, every tried setting's numbers)."""
    tried = []
    for setting in GRIDS[name]:
        s = run_setting(name, tuning_day, setting).summary()
        tried.append({"setting": setting, "gpu_hours": s["gpu_hours"], "attainment": attainment(s)})
    return choose(tried, goal)["setting"], tried


_DAYS: tuple[Scenario, Scenario] | None = None  # this process's (tuning day, scoring day), shared by its jobs


def _hold_days(tuning_day: Scenario, scoring_day: Scenario) -> None:
    """A worker's days, handed over once: every job of the worker runs on the same objects, so their
    capacities and memos (the same rates at the same ticks) serve all of them."""
    global _DAYS
    _DAYS = (tuning_day, scoring_day)
    if multiprocessing.parent_process() is not None:
        gc.freeze()
        quiet_collector()


def quiet_collector() -> None:
    """For a worker process: its heap mostly grows (memos) and its garbage is acyclic, freed as it goes, so
    the collector runs rarely (its full passes over the memos took a fifth of a simulated day); what a job
    leaves is frozen out of its sight after the job (`gc.freeze`)."""
    gc.set_threshold(100_000, 50, 1000)


def _simulate_one(job: tuple) -> tuple[tuple, object, float]:
    """One job in a worker, on the days `_hold_days` gave it: (job key, what it gives, seconds). Jobs: one of
    curation's candidates on the tuning day (its run); a policy on the scoring day; ours at one setting on the
    tuning day (its summary, and at the curated targets the forecast history it leaves for the scoring day);
    ours at the chosen setting on the scoring day (with its mode's history). Ours' jobs get the decode-TPS
    candidates' runs their settings come from (`curation.ours_stress`), made in whichever process ran them."""
    import time

    kind, name, arg = job
    tuning_day, scoring_day = _DAYS
    began = time.perf_counter()
    if kind == "candidate":
        out = candidate_runs(tuning_day, [name])[name]
    elif kind == "policy":
        out = POLICIES[name](scoring_day, tuning_day)
    elif kind == "mode":
        mode, runs = arg
        keep_runs(tuning_day, runs)
        summary = run_heteroscale(tuning_day, tuned_on=tuning_day, **mode).summary()
        carried = mode["predict"] and mode == curated(mode)  # the run whose history the scoring day carries
        out = summary, kept_history(tuning_day, tuning_day, mode["adaptive"]) if carried else None
    else:  # "ours"
        mode, runs, history = arg
        keep_runs(tuning_day, runs)
        if history is not None:  # the tuning day's run in this mode, made in another process
            carry_history((tuning_day.name, tuning_day.name, mode["adaptive"]), history)
        out = run_heteroscale(scoring_day, tuned_on=tuning_day, **mode)
    if multiprocessing.parent_process() is not None:
        # A worker keeps what its runs left (the days' capacities and memos) until it exits: out of the
        # collector's sight, its full passes no longer walk them (as in `bench.sim.suite`).
        gc.freeze()
    return (kind, name), out, time.perf_counter() - began


class _Jobs:
    """The jobs of one `simulate` call, each started when what it needs is in, the most urgent first:
    ours' scoring run (the end of the longest chain), the decode-TPS candidates (every mode of ours waits on
    them), ours' modes on the tuning day (the forecast ones first: they run the day before as well), then the
    policies and curation's other candidates. At most `workers` run at a time, so a job that becomes ready
    never queues behind ones that could wait."""

    def __init__(self, pool, workers: int):
        self.pool, self.workers, self.ready, self.running = pool, workers, [], set()

    def add(self, urgency: int, job: tuple) -> None:
        self.ready.append((urgency, len(self.ready), job))

    def finished(self):
        """Start what may start; then wait for the next job to finish and return its result (None: none left)."""
        while self.ready and len(self.running) < self.workers:
            self.ready.sort()
            self.running.add(self.pool.submit(_simulate_one, self.ready.pop(0)[2]))
        if not self.running:
            return None
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        self.running.remove(future)
        return future.result()


def simulate(scenario: Scenario, policies: Sequence[str], progress=None, tune_baselines: bool = False,
             workers: int = 1) -> tuple[dict, dict[str, PolicyResult]]:
    """Run the policies on the scenario's scoring day with settings from its tuning day (`bench.sim.days`):
    ours curated there, each baseline at its default setting with bounds and forecasts from there; with
    `tune_baselines`, also each baseline at the setting of its grid chosen there (`<name>_tuned`, `tune_on`).
    Curation's candidates and ours' modes run on the tuning day as jobs of their own (`_Jobs`), so `workers`
    processes share them; ours is scored once they chose."""
    import time

    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    start = time.perf_counter()
    tuning_day, scoring_day = tuning_and_scoring(scenario)
    results = {}
    if progress:
        progress(f"simulating {', '.join(policies)} on {scoring_day.name} (settings from {tuning_day.name}, "
                 f"{workers} processes) ...")
    ours = "heteroscale" in policies
    modes = modes_to_try(tuning_day) if ours else []
    runs, settings, histories = {}, {}, {}  # ours' settings on the tuning day by name: {setting, GPU-h, attainment}
    stages = list(CURATION_STAGES)  # what curation tries after the modes' settings, each from the best so far

    def attempt(urgency: int, setting: dict) -> None:
        settings[setting_name(setting)] = {"setting": setting}
        jobs.add(urgency, ("mode", setting_name(setting), (setting, decode_runs)))

    pool = ProcessPoolExecutor(max_workers=workers, initializer=_hold_days, initargs=(tuning_day, scoring_day)) \
        if workers > 1 else _InProcess()
    if workers <= 1:
        _hold_days(tuning_day, scoring_day)
    with pool:
        jobs = _Jobs(pool, max(workers, 1))
        for name in CANDIDATES if ours else ():
            jobs.add(1 if name in DECODE_CANDIDATES else 5, ("candidate", name, None))
        for name in policies:
            if name != "heteroscale":
                jobs.add(4, ("policy", name, None))
        while (finished := jobs.finished()) is not None:
            (kind, name), out, spent = finished
            if kind == "candidate":
                runs[name] = out
                if progress:
                    progress(f"  curation: the {name} candidate on the tuning day ({spent:.1f} s)")
                if name in DECODE_CANDIDATES and all(m in runs for m in DECODE_CANDIDATES):
                    decode_runs = {m: runs[m] for m in DECODE_CANDIDATES}
                    for mode in modes:  # the forecast modes first: they carry a day before
                        for setting in mode_settings(mode):
                            attempt(2 if mode["predict"] else 3, setting)
            elif kind == "mode":
                summary, history = out
                settings[name]["gpu_hours"], settings[name]["attainment"] = summary["gpu_hours"], attainment(summary)
                if history is not None:
                    histories[name] = history
                if progress:
                    progress(f"  heteroscale ({name}) on the tuning day: {summary['gpu_hours']:,.0f} GPU-h, "
                             f"attainment {settings[name]['attainment']:.4f} ({spent:.1f} s)")
                if not all("attainment" in t for t in settings.values()):
                    continue  # a stage still running
                # a stage tried: the best so far over the next stage (`bench.sim.world.ours_mode`'s rule), or scored
                if stages:
                    for setting in stages.pop(0)(choose(list(settings.values()))["setting"]):
                        attempt(1, setting)
                else:
                    chosen = choose(list(settings.values()))["setting"]
                    history = histories.get(mode_name(chosen))  # the curated run's, as `world._history` keeps
                    jobs.add(0, ("ours", "heteroscale", (chosen, decode_runs, history)))
            else:
                results[name] = out
                if progress:
                    s = out.summary()
                    progress(f"[{len(results)}/{len(policies)}] {name}: {s['gpu_hours']:,.0f} GPU-h, attainment "
                             f"TTFT {s['slo_attainment_ttft']:.4f} / TBT {s['slo_attainment_tbt']:.4f} "
                             f"({spent:.1f} s, {time.perf_counter() - start:.0f} s in all)")
    curation = None
    if ours:
        keep_runs(tuning_day, runs)
        curation = {k: v for k, v in curate(tuning_day).items() if k != "stress"}
        curation["mode"] = {"chosen": chosen, "tried_on_tuning_day": list(settings.values())}
    results = {name: results[name] for name in policies}
    tuning = {}
    if tune_baselines:
        for name in [p for p in policies if p in GRIDS and len(GRIDS[p]) > 1]:
            if progress:
                progress(f"tuning {name} on {tuning_day.name} (goal {TTFT_GOAL}) ...")
            setting, tried = tune_on(tuning_day, name)
            results[f"{name}_tuned"] = run_setting(name, scoring_day, setting, tuning_day)
            tuning[f"{name}_tuned"] = {"setting": setting, "tuned_on": tuning_day.name, "attainment_goal": TTFT_GOAL,
                                       "tried_on_tuning_day": tried}
    summary = {"scenario": scenario.name, "tuned_on": tuning_day.name, "scored_on": scoring_day.name,
               "held_out": scenario.days is not None,
               "wall_s": round(time.perf_counter() - start, 2),
               "fleet": {"gpus": sum(n.total_gpus for n in scenario.nodes), "services": len(scenario.services),
                         "duration_s": scenario.duration_s, "tick_s": scenario.tick_s,
                         "startup_s": scenario.startup_s},
               "policies": {name: r.summary() for name, r in results.items()},
               "infeasible_services": infeasible_services(scenario)}
    if tuning:
        summary["tuning"] = tuning
    if ours:
        summary["curation"] = curation
    summary["goals"] = _goals(summary["policies"])
    return summary, results


def infeasible_services(scenario: Scenario) -> list[dict]:
    """Services whose TTFT SLO no number of instances meets for 99 % of requests, with the best attainable."""
    out = []
    for svc in scenario.services:
        cap = Capacity.of(svc)
        if not cap.feasible:
            out.append({"service": svc.name, "ttft_slo_s": svc.ttft_slo_s,
                        "prefill_time_s": round(cap.prefill_time_s, 4), "kv_transfer_s": round(cap.kv_transfer_s, 4),
                        "best_attainable_ttft_attainment": round(cap.best_ttft_attainment(), 4)})
    return out


def _goals(p: dict) -> dict:
    """The issue's goals as measured numbers (reported, never asserted)."""
    goals = {}
    ours = p.get("heteroscale")
    if ours and "oracle" in p:
        goals["gpu_hours_vs_oracle"] = round(ours["gpu_hours"] / max(p["oracle"]["gpu_hours"], 1e-9), 3)
        goals["gpu_hours_vs_oracle_goal"] = 1.10
    if ours:
        goals["slo_attainment_min"] = min(ours["slo_attainment_ttft"], ours["slo_attainment_tbt"])
        goals["slo_attainment_goal"] = 0.99
        others = {k: v for k, v in p.items() if k not in ("heteroscale", "oracle")}
        goals["fewer_gpu_hours_than"] = sorted(k for k, v in others.items() if ours["gpu_hours"] < v["gpu_hours"])
        goals["more_gpu_hours_than"] = sorted(k for k, v in others.items() if ours["gpu_hours"] >= v["gpu_hours"])
        # the goal proper: against the baselines that reach our attainment (both SLOs)
        ours_att = goals["slo_attainment_min"]
        equal = {k: v for k, v in others.items() if min(v["slo_attainment_ttft"], v["slo_attainment_tbt"]) >= ours_att}
        goals["baselines_reaching_our_attainment"] = sorted(equal)
        goals["fewer_gpu_hours_than_every_baseline_at_our_attainment"] = all(
            ours["gpu_hours"] < v["gpu_hours"] for v in equal.values())
    if ours and "hpa_gpu_util" in p:
        goals["avg_gpu_util_points_above_hpa"] = round(100 * (ours["avg_gpu_util"] - p["hpa_gpu_util"]["avg_gpu_util"]), 2)
        goals["avg_gpu_util_points_goal"] = 26.6
    if ours and "hpa_gpu_util_tuned" in p:  # the paper's headline, at equal attainment
        goals["avg_gpu_util_points_above_hpa_tuned"] = round(
            100 * (ours["avg_gpu_util"] - p["hpa_gpu_util_tuned"]["avg_gpu_util"]), 2)
    return goals


def write_plots(summary: dict, results: dict[str, PolicyResult], out_dir) -> list[str]:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for name, res in results.items():
        ts = sorted(res.per_tick)
        axes[0].plot([t / 3600 for t in ts], [res.per_tick[t][0] for t in ts], label=name)
        axes[1].plot([t / 3600 for t in ts], [res.per_tick[t][1] / max(res.per_tick[t][0], 1e-9) for t in ts],
                     label=name)
    axes[0].set_ylabel("allocated GPUs")
    axes[1].set_ylabel("avg GPU util")
    axes[1].set_xlabel("hours")
    axes[0].legend(fontsize="small", ncol=4)
    fig.tight_layout()
    timeline = out / "instances_and_util.png"
    fig.savefig(timeline, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in summary["policies"].items():
        attainment = min(s["slo_attainment_ttft"], s["slo_attainment_tbt"])
        ax.scatter(s["gpu_hours"], attainment)
        ax.annotate(name, (s["gpu_hours"], attainment), fontsize="small")
    ax.set_xlabel("GPU-hours")
    ax.set_ylabel("SLO attainment (min of TTFT, TBT)")
    fig.tight_layout()
    tradeoff = out / "gpu_hours_vs_slo.png"
    fig.savefig(tradeoff, dpi=90)
    plt.close(fig)
    return [str(timeline), str(tradeoff)]
