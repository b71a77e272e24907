"""Baselines and references for the fleet simulator. They are not `autoscaler.policy.decide` policies and do not
run the control cycle: each sets (P, D) per service and tick directly, with no topology or placement, as the
peers users run today size their pools. Reactive, per pool: Kubernetes HPA on GPU utilization, Ray Serve's
default ongoing-requests policy, a periodic schedule and a Dynamo-style SLA planner. References: static_peak
(sized once for the peak) and oracle (the fewest instances that meet the SLOs at every tick, no start-up).
Pure Python; no clock.
"""

from __future__ import annotations

import math

from bench.sim.model import (
    Instances,
    PolicyResult,
    Scenario,
    Tick,
    evaluate,
    fit_to_fleet,
    groups_needed,
    sized_counts,
    role_utils,
    serve_split,
)


def run_counts_policy(scenario: Scenario, counts_at) -> PolicyResult:
    """A reference that sets (P, D) per service and tick directly (no start-up, no placement; bounded by the
    fleet's GPUs), scored per group: the counts split evenly into the fewest groups its domains hold."""
    caps = {s.name: s.capacities for s in scenario.services}
    result, t = PolicyResult(), 0.0
    while t < scenario.duration_s:
        here = {s.name: caps[s.name].at(t) for s in scenario.services}
        counts, cut = fit_to_fleet(scenario, {name: counts_at(*here[name], t) for name in here})
        result.unplaced += cut
        for svc in scenario.services:
            svc_t, cap = here[svc.name]
            pd = counts[svc.name]
            serve_split(result, svc_t, cap, svc.shape.rate(t), pd, pd, groups_needed(scenario, svc, pd),
                        scenario.tick_s, t)
        t += scenario.tick_s
    return result


def run_oracle(scenario: Scenario, goal: float | None = None) -> PolicyResult:
    """The fewest instances that meet the SLOs for `goal` of each tick's requests (default 99 %), from the
    tick's exact load and mix, with no start-up: a lower bound on the GPU-hours of any policy that meets the
    per-tick goal inside this model (not on one that misses it where few requests are)."""
    return run_counts_policy(scenario, lambda svc, cap, t: sized_counts(scenario, svc, cap, svc.shape.rate(t), goal))


def run_static_peak(scenario: Scenario, tuned_on: Scenario | None = None) -> PolicyResult:
    """Static provisioning for the peak of the tuning day (`tuned_on`, default this one)."""
    basis = tuned_on or scenario
    peaks = basis.peak_counts
    return run_counts_policy(scenario, lambda svc, cap, t: peaks[svc.name])


def max_replicas(scenario: Scenario, factor: float = 2.0) -> dict[str, tuple[int, int]]:
    """A user's maxReplicas per role: `factor` x what the (tuning) day's peak needs."""
    peaks = scenario.peak_counts
    return {name: (max(1, math.ceil(factor * p)), max(1, math.ceil(factor * d))) for name, (p, d) in peaks.items()}


def run_reactive(scenario: Scenario, desire, bounds: dict[str, tuple[int, int]] | None = None) -> PolicyResult:
    """A per-service reactive baseline: `desire(svc, cap, mem, last_tick, run, t) -> (P, D)` every tick (the
    service and capacity as they are at t), new instances Ready after each role's start-up, removals at once,
    each role bounded by `bounds` (a user's maxReplicas; default `max_replicas(scenario)`), all services
    together by the fleet's GPUs (`fit_to_fleet`), scored per group (`serve_split`). Baselines are not
    limited by the topology (that can only flatter them); `mem` is the baseline's own state."""
    caps = {s.name: s.capacities for s in scenario.services}
    bounds = bounds or max_replicas(scenario)
    runs = {s.name: Instances(*sized_counts(scenario, *caps[s.name].at(0.0), s.shape.rate(0.0)))
            for s in scenario.services}
    # warm at t = 0, like ours: sized for the load at the window's start
    mems: dict[str, dict] = {s.name: {} for s in scenario.services}
    last: dict[str, Tick | None] = {s.name: None for s in scenario.services}
    result, t = PolicyResult(), 0.0
    while t < scenario.duration_s:
        wants = {}
        here = {s.name: caps[s.name].at(t) for s in scenario.services}
        for svc in scenario.services:
            run = runs[svc.name]
            run.promote(t)
            want = desire(*here[svc.name], mems[svc.name], last[svc.name], run, t)
            bound = bounds[svc.name]
            wants[svc.name] = (min(max(1, want[0]), bound[0]), min(max(1, want[1]), bound[1]))
        wants, cut = fit_to_fleet(scenario, wants)
        result.unplaced += cut
        for svc in scenario.services:
            run, want = runs[svc.name], wants[svc.name]
            svc_t, cap = here[svc.name]
            if want != run.allocated():
                result.num_scale_actions += 1
            run.resize(want, t, svc.startup(scenario.startup_s))
            if want[0] != math.ceil(want[1] * cap.ratio - 1e-9):
                result.ratio_violations += 1
            ready = (run.ready_prefill, run.ready_decode)
            last[svc.name] = serve_split(result, svc_t, cap, svc.shape.rate(t), ready, run.allocated(),
                                         groups_needed(scenario, svc, ready), scenario.tick_s, t)
        t += scenario.tick_s
    return result


def _hpa(target_util: float = 0.6, tolerance: float = 0.1, down_window_s: float = 300.0):
    """Kubernetes HPA on GPU utilization, one per pool: desired = ceil(current x util / target) outside a 10 %
    tolerance; scale-up at once, scale-down to the highest desire of the last 5 minutes (stabilization)."""

    def desire(svc, cap, mem, last, run, t):
        if last is None:
            return run.ready_prefill, run.ready_decode
        util_p, _, util_d, _ = role_utils(svc, cap, last, svc.shape.rate(t), run.ready_prefill, run.ready_decode)
        out = []
        for role, current, util in (("p", run.ready_prefill, util_p), ("d", run.ready_decode, util_d)):
            ratio = util / target_util
            raw = current if abs(ratio - 1) <= tolerance else math.ceil(current * ratio - 1e-9)
            history = [(ts, v) for ts, v in mem.get(role, []) if ts > t - down_window_s] + [(t, raw)]
            mem[role] = history
            out.append(max(v for _, v in history))
        return out[0], out[1]

    return desire


def _serve_queue(target_prefill: float = 2.0, target_decode: float = 2.0, upscale_delay_s: float = 30.0,
                 downscale_delay_s: float = 600.0, decode_fraction: float | None = None):
    """Ray Serve's queue policy per pool: desired = ongoing requests / target_ongoing_requests, one target per
    role (users set prefill and decode apart; Serve's default is 2 for both, Ray Serve LLM's builder sets 1e9,
    i.e. never scale on load), acting only after the desire persisted for upscale_delay_s (30 s) /
    downscale_delay_s (600 s). With `decode_fraction`, each service's decode target is that share of the
    requests one decode instance holds at its TBT capacity (what a user would set from a profile)."""

    def desire(svc, cap, mem, last, run, t):
        if last is None:
            return run.ready_prefill, run.ready_decode
        if decode_fraction is not None and "target_decode" not in mem:
            at_capacity = evaluate(svc, cap, cap.cap_decode_tps / svc.mean_output, 10**6, 1)
            mem["target_decode"] = max(1.0, decode_fraction * cap.cap_decode_tps * at_capacity.tbt_s)
        target_d = mem.get("target_decode", target_decode)
        rps = svc.shape.rate(t)
        ongoing_p = rps * last.ttft_mean_s
        ongoing_d = rps * (last.ttft_mean_s + svc.mean_output * last.tbt_s)
        out = []
        for role, current, ongoing, target in (("p", run.ready_prefill, ongoing_p, target_prefill),
                                               ("d", run.ready_decode, ongoing_d, target_d)):
            raw = max(1, math.ceil(ongoing / target - 1e-9))
            direction = (raw > current) - (raw < current)
            since = mem.get(role + "_since") if mem.get(role + "_dir") == direction else t
            mem[role + "_dir"], mem[role + "_since"] = direction, since
            delay = upscale_delay_s if direction > 0 else downscale_delay_s
            out.append(raw if direction and t - since >= delay else current)
        return out[0], out[1]

    return desire


def _periodic(plan: Scenario, window_s: float = 3600.0, margin: float = 1.0, lead: bool = True):
    """Periodic policy (paper §4.3): per window of the day a static (P, D), sized for `margin` x the window's
    peak of the load `plan` forecasts (the tuning day: a schedule is written from earlier days), and started a
    start-up ahead of the window (`lead`, as a cron schedule is), so a rising window is Ready on time."""
    services = {s.name: s for s in plan.services}
    caps = {s.name: s.capacities for s in plan.services}

    def sized(name: str, start: float) -> tuple[int, int]:
        svc, best = services[name], (1, 1)
        for i in range(int(window_s // plan.tick_s)):
            t = start + i * plan.tick_s
            need = sized_counts(plan, *caps[name].at(t), margin * svc.shape.rate(t))
            best = (max(best[0], need[0]), max(best[1], need[1]))
        return best

    def desire(svc, cap, mem, last, run, t):
        ahead = max(svc.startup(plan.startup_s)) if lead else 0.0
        want = (1, 1)
        for at in {t, t + ahead}:
            start = math.floor(at / window_s) * window_s
            if start not in mem:  # size each window once
                mem[start] = sized(svc.name, start)
            want = (max(want[0], mem[start][0]), max(want[1], mem[start][1]))
        return want

    return desire


def _sla_planner(scenario: Scenario, headroom: float = 1.0):
    """Dynamo-style SLA planner: predict the next interval's load as the last one (times `headroom`), size
    prefill and decode separately from profiled throughput at the TTFT/ITL targets, scaled by correction
    factors (observed / expected latency of the last interval)."""

    def desire(svc, cap, mem, last, run, t):
        observed = svc.shape.rate(max(t - scenario.tick_s, 0.0))  # the last interval's load
        p, d = sized_counts(scenario, svc, cap, headroom * observed)
        if last is not None and run.ready_prefill and run.ready_decode:
            # what the profile expects at the load that was observed (the headroom is not part of it: an
            # expectation at the inflated load made every correction shrink the pools again)
            expected = evaluate(svc, cap, observed, run.ready_prefill, run.ready_decode)
            ttft_correction = min(max(last.ttft_p90_s / max(expected.ttft_p90_s, 1e-9), 0.5), 2.0)
            itl_correction = min(max(last.tbt_s / max(expected.tbt_s, 1e-9), 0.5), 2.0)
            p = max(1, math.ceil(p * ttft_correction - 1e-9))
            d = max(1, math.ceil(d * itl_correction - 1e-9))
        return p, d

    return desire


# One fine headroom grid for every policy that has a headroom (ours' decode target is 1 / h of the measured
# capacity; the SLA planner's load and the periodic schedule's forecast are h x): no grid gap decides a winner.
HEADROOM_GRID = (1.0, 1.02, 1.04, 1.06, 1.1, 1.15, 1.2)
# What each baseline's operators tune: the settings a sweep tries, each {name: value}; the first is the default.
# HPA and the Serve queue also take maxReplicas (`max_factor` x the tuning day's peak need).
GRIDS = {
    "hpa_gpu_util": ([{"target_util": u, "max_factor": 2.0} for u in (0.6, 0.7, 0.8)]
                     + [{"target_util": u, "max_factor": 1.25} for u in (0.7, 0.8)]),
    "serve_queue": ([{"target_prefill": 2.0, "target_decode": 2.0, "max_factor": 2.0}]
                    + [{"target_prefill": 1.0, "decode_fraction": f, "max_factor": 2.0} for f in (0.6, 0.75, 0.9)]
                    + [{"target_prefill": 2.0, "decode_fraction": 0.75, "max_factor": 2.0}]),
    "serve_llm_default": [{"target_prefill": 1e9, "target_decode": 1e9, "max_factor": 2.0}],
    "periodic": ([{"window_s": 3600.0, "margin": h} for h in HEADROOM_GRID[:5]]
                 + [{"window_s": 1800.0, "margin": 1.02}]),
    "sla_planner": [{"headroom": h} for h in HEADROOM_GRID],
}


def run_setting(name: str, scenario: Scenario, setting: dict, tuned_on: Scenario | None = None) -> PolicyResult:
    """A baseline at one setting of its grid, bounds and forecasts from `tuned_on` (default this scenario)."""
    basis = tuned_on or scenario
    factor = setting.get("max_factor", 2.0)
    if name == "hpa_gpu_util":
        desire = _hpa(target_util=setting["target_util"])
    elif name in ("serve_queue", "serve_llm_default"):
        desire = _serve_queue(setting["target_prefill"], setting.get("target_decode", 2.0),
                              decode_fraction=setting.get("decode_fraction"))
    elif name == "periodic":
        desire = _periodic(basis, setting["window_s"], setting["margin"])
    elif name == "sla_planner":
        desire = _sla_planner(scenario, setting["headroom"])
    else:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(GRIDS)}")
    return run_reactive(scenario, desire, max_replicas(basis, factor))
