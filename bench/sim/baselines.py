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
    Capacity,
    Instances,
    PolicyResult,
    Scenario,
    Tick,
    account,
    evaluate,
    fit_to_fleet,
    oracle_counts,
    peak_counts,
    role_utils,
)


def run_counts_policy(scenario: Scenario, counts_at) -> PolicyResult:
    """A baseline that sets (P, D) per service and tick directly (no startup, no placement; bounded by the
    fleet's GPUs)."""
    caps = {s.name: Capacity.of(s) for s in scenario.services}
    result, t = PolicyResult(), 0.0
    while t < scenario.duration_s:
        counts, cut = fit_to_fleet(scenario, {s.name: counts_at(s, caps[s.name], t) for s in scenario.services})
        result.unplaced += cut
        for svc in scenario.services:
            cap, rps = caps[svc.name], svc.shape.rate(t)
            p, d = counts[svc.name]
            tick = evaluate(svc, cap, rps, p, d)
            account(result, svc, cap, tick, rps, (p, d), (p, d), scenario.tick_s, t)
        t += scenario.tick_s
    return result


def run_oracle(scenario: Scenario) -> PolicyResult:
    return run_counts_policy(scenario, lambda svc, cap, t: oracle_counts(svc, cap, svc.shape.rate(t)))


def run_static_peak(scenario: Scenario) -> PolicyResult:
    peaks = peak_counts(scenario, {s.name: Capacity.of(s) for s in scenario.services})
    return run_counts_policy(scenario, lambda svc, cap, t: peaks[svc.name])


def run_reactive(scenario: Scenario, desire) -> PolicyResult:
    """A per-service reactive baseline: `desire(svc, cap, mem, last_tick, run, t) -> (P, D)` every tick, new
    instances Ready after `startup_s`, removals at once, each role bounded by 2x its peak need (a user's
    maxReplicas), and all services together by the fleet's GPUs (`fit_to_fleet`). Baselines are not limited
    by the topology (that can only flatter them); `mem` is the baseline's own state (delays, windows)."""
    caps = {s.name: Capacity.of(s) for s in scenario.services}
    max_counts = {name: (2 * p, 2 * d) for name, (p, d) in peak_counts(scenario, caps).items()}
    runs = {s.name: Instances(*oracle_counts(s, caps[s.name], s.shape.rate(0.0))) for s in scenario.services}
    # warm at t = 0, like ours: sized for the load at the window's start
    mems: dict[str, dict] = {s.name: {} for s in scenario.services}
    last: dict[str, Tick | None] = {s.name: None for s in scenario.services}
    result, t = PolicyResult(), 0.0
    while t < scenario.duration_s:
        wants = {}
        for svc in scenario.services:
            run = runs[svc.name]
            run.promote(t)
            want = desire(svc, caps[svc.name], mems[svc.name], last[svc.name], run, t)
            bound = max_counts[svc.name]  # like a user's maxReplicas: 2x what the peak needs
            wants[svc.name] = (min(max(1, want[0]), bound[0]), min(max(1, want[1]), bound[1]))
        wants, cut = fit_to_fleet(scenario, wants)
        result.unplaced += cut
        for svc in scenario.services:
            run, cap, want = runs[svc.name], caps[svc.name], wants[svc.name]
            have = run.allocated()
            if want != have:
                result.num_scale_actions += 1
            run.resize(want, t, scenario.startup_s)
            if want[0] != math.ceil(want[1] * cap.ratio - 1e-9):
                result.ratio_violations += 1
            rps = svc.shape.rate(t)
            tick = evaluate(svc, cap, rps, run.ready_prefill, run.ready_decode)
            last[svc.name] = tick
            account(result, svc, cap, tick, rps, (run.ready_prefill, run.ready_decode), run.allocated(),
                    scenario.tick_s, t)
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


def _serve_queue(target_ongoing: float = 2.0, upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0):
    """Ray Serve's default policy per pool: desired = ongoing requests / target_ongoing_requests (2), acting only
    after the desire persisted for upscale_delay_s (30 s) / downscale_delay_s (600 s)."""

    def desire(svc, cap, mem, last, run, t):
        if last is None:
            return run.ready_prefill, run.ready_decode
        rps = svc.shape.rate(t)
        ongoing_p = rps * last.ttft_mean_s
        ongoing_d = rps * (last.ttft_mean_s + svc.mean_output * last.tbt_s)
        out = []
        for role, current, ongoing in (("p", run.ready_prefill, ongoing_p), ("d", run.ready_decode, ongoing_d)):
            raw = max(1, math.ceil(ongoing / target_ongoing - 1e-9))
            direction = (raw > current) - (raw < current)
            since = mem.get(role + "_since") if mem.get(role + "_dir") == direction else t
            mem[role + "_dir"], mem[role + "_since"] = direction, since
            delay = upscale_delay_s if direction > 0 else downscale_delay_s
            out.append(raw if direction and t - since >= delay else current)
        return out[0], out[1]

    return desire


def _periodic(scenario: Scenario, window_s: float = 3600.0):
    """Periodic policy (paper §4.3): per window of the day a static (P, D), sized for the window's peak from the
    known diurnal shape (the best a schedule can do)."""

    def desire(svc, cap, mem, last, run, t):
        start = math.floor(t / window_s) * window_s
        if mem.get("window") != start:  # size each window once
            peak = max(svc.shape.rate(start + i * scenario.tick_s) for i in range(int(window_s // scenario.tick_s)))
            mem["window"], mem["counts"] = start, oracle_counts(svc, cap, peak)
        return mem["counts"]

    return desire


def _sla_planner(scenario: Scenario, headroom: float = 1.0):
    """Dynamo-style SLA planner: predict the next interval's load as the last one (times `headroom`), size
    prefill and decode separately from profiled throughput at the TTFT/ITL targets, scaled by correction
    factors (observed / expected latency of the last interval)."""

    def desire(svc, cap, mem, last, run, t):
        observed = svc.shape.rate(max(t - scenario.tick_s, 0.0))  # the last interval's load
        p, d = oracle_counts(svc, cap, headroom * observed)
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


# The one knob each baseline's operators tune, and the values a sweep tries (defaults first).
SWEEPS = {
    "hpa_gpu_util": ("target_util", (0.6, 0.3, 0.4, 0.5, 0.7, 0.8, 0.9), lambda sc, v: _hpa(target_util=v)),
    "serve_queue": ("target_ongoing", (2.0, 0.5, 1.0, 4.0), lambda sc, v: _serve_queue(target_ongoing=v)),
    "periodic": ("window_s", (3600.0, 900.0, 1800.0, 7200.0), lambda sc, v: _periodic(sc, window_s=v)),
    "sla_planner": ("headroom", (1.0, 1.1, 1.25), lambda sc, v: _sla_planner(sc, headroom=v)),
}


def run_tuned(scenario: Scenario, name: str, attainment_goal: float) -> tuple[PolicyResult, dict]:
    """The baseline at the sweep value with the fewest GPU-hours among those whose TTFT and TBT attainment both
    reach `attainment_goal` (equal attainment); if none does, the one with the best attainment. Returns the
    result and {knob, value, met_goal, tried}."""
    knob, values, make = SWEEPS[name]
    runs = [(v, run_reactive(scenario, make(scenario, v))) for v in values]

    def attainment(res: PolicyResult) -> float:
        s = res.summary()
        return min(s["slo_attainment_ttft"], s["slo_attainment_tbt"])

    meeting = [(v, r) for v, r in runs if attainment(r) >= attainment_goal]
    value, best = min(meeting, key=lambda vr: vr[1].gpu_hours) if meeting else max(runs, key=lambda vr: attainment(vr[1]))
    return best, {"knob": knob, "value": value, "met_goal": bool(meeting), "attainment_goal": attainment_goal,
                  "tried": {str(v): {"gpu_hours": round(r.gpu_hours, 1), "attainment": attainment(r)}
                            for v, r in runs}}


def run_hpa_gpu_util(scenario: Scenario) -> PolicyResult:
    return run_reactive(scenario, _hpa())


def run_serve_queue(scenario: Scenario) -> PolicyResult:
    return run_reactive(scenario, _serve_queue())


def run_periodic(scenario: Scenario) -> PolicyResult:
    return run_reactive(scenario, _periodic(scenario))


def run_sla_planner(scenario: Scenario) -> PolicyResult:
    return run_reactive(scenario, _sla_planner(scenario))
