"""The HeteroScale policy: one pure decision function that scales prefill and decode together.

`decide(state, observation, now_s, config) -> (Decision, state)`. Pure: no Ray, vLLM, HTTP, clock or
environment; equal inputs give equal outputs. The shared control cycle (`autoscaler.cycle`) calls it for the
live controller and the fleet simulator alike. (The simulator's baselines are not policies of this kind: they
size each pool directly, see `bench/sim/baselines.py`.)

Per service, in order:
1. a soft scale-in in progress is resolved first: restore at once if SLOs degrade (or load returns), terminate
   the withdrawn instances once the observation window passed with fresh data, else keep observing;
2. the latency safety net (tiered TBT/TTFT thresholds) adds a fixed +x % of both pools, overriding a hold;
3. proportional control on decode TPS from demand x = tps / target: D = ceil(x), P = ceil(x x ratio) (rounded
   once, `PolicyConfig.pair_for_demand`), hysteresis band (it holds only while TBT meets its SLO: a saturated
   decode pool reports its capacity, inside the band of a target just under it), separate cooldowns,
   dampened steps (not while decode is saturated: demand above the size with TBT over its SLO is sized in one
   step), bounds; fresh zero traffic goes to the minimum; stale/NaN data holds;
4. the periodic schedule sets the size (PERIODIC) or floors it (METRICS_WITH_SCHEDULE_FLOOR);
5. a fleet GPU budget, if set, is shared by priority (higher first; equal priorities in proportion to what they
   ask above their floors), never below a service's floor (`PolicyConfig.fleet_floor`, (0, 0) for a
   best-effort service); `place()` keeps it per GPU type (`autoscaler.fleet`).
A service held below its own minimum (a preemption took its groups, `autoscaler.fleet`) asks its minimum back
first (reason RECLAIM); the cycle places it where a higher priority leaves room.
Scale-in never happens at once: the Decision withdraws instances from routing first.

Adaptive ratio (`target_prefill_tps_per_instance`): see `autoscaler.ratio`.

Start-up-aware forecast (when `forecast_period_s` is set; `autoscaler.forecast`): every fresh decode tokens/s
feeds the service's seasonal profile; the peak demand from now to one measured start-up (the observation's
`startup_s`) plus one profile bin ahead is forecast from earlier periods at today's level, widened by the
tracked forecast error, and floors the decode demand the proportional rule sizes from where it asks for more
decode replicas than the observed load (reason FORECAST, holds included). A forecast only ever raises the
demand: it scales out ahead of a ramp, holds capacity a ramp is about to need (a soft scale-in is restored when
the forecast says its load returns within a start-up), never cuts alone. No earlier
period, no measured start-up or missing data: no forecast, the rule is reactive.

Burst path (when `burst_queue_per_decode` is set): requests waiting at the engines now plus those the ingress
shed, per ready decode replica, past the threshold act at once, without the rate window: a soft scale-in in
progress is restored (withdrawn replicas serve again in a moment, a cold start takes minutes); otherwise both
pools step out like the severe latency tier (sharing its cooldown, waiting while replicas start), and no
scale-in happens while requests queue.
"""

from __future__ import annotations

import math
from typing import Mapping

from autoscaler.forecast import Profile
from autoscaler.frozen import evolve
from autoscaler.model import (
    Action,
    Decision,
    Diagnostics,
    FleetConfig,
    Mode,
    Observation,
    PolicyConfig,
    PolicyState,
    Reason,
    ServiceDecision,
    ServiceObservation,
    ServiceState,
    SoftScaleIn,
)
from autoscaler.ratio import (SECONDS_PER_DAY, current_ratio, estimate_ratio, holding_ratio, prefill_in_band,
                              wanted_ratio)



def _elapsed(now_s: float, since_s: float | None) -> float:
    return math.inf if since_s is None else now_s - since_s


def _burst(cfg: PolicyConfig, obs: ServiceObservation | None, now_s: float) -> float | None:
    """Queued requests per ready decode replica when past `burst_queue_per_decode` (fresh data), else None."""
    if cfg.burst_queue_per_decode is None or obs is None:
        return None
    queued = obs.queued.fresh(now_s, cfg.staleness_limit_s)
    per = None if queued is None else queued / max(1, obs.decode.ready)
    return per if per is not None and per > cfg.burst_queue_per_decode else None


def _forecast(cfg: PolicyConfig, st: ServiceState, obs: ServiceObservation, tps: float, now_s: float
              ) -> tuple[ServiceState, float | None]:
    """Feed the profile with `tps` and forecast one measured start-up ahead (module docstring): (state, the
    widened forecast or None)."""
    profile = st.profile or Profile.empty(cfg.forecast_period_s, cfg.forecast_bin_s, now_s)
    profile = profile.observe(now_s, tps)
    startup = obs.startup_s.value if obs is not None else None
    widened = None
    if startup is not None and startup >= 0 and tps > 0:
        raw = profile.forecast(now_s, startup)
        if raw is not None:  # the point forecast at now + start-up is scored against what comes then
            point = profile.expected(now_s, now_s + startup, profile.todays_level(now_s, startup))
            profile = profile if point is None else profile.remember(now_s + startup, point)
            widened = profile.widened(raw)
    return evolve(st, profile=profile), widened


def _initial_state(cfg: PolicyConfig, obs: ServiceObservation | None) -> ServiceState:
    """A service with no state (first start, or a lost one) starts from what its groups hold (within the
    bounds), never from what the ratio implies: a seed below the view would be a cut nobody decided."""
    held = (0, 0) if obs is None else tuple(c.ready + c.pending + c.withdrawn for c in (obs.prefill, obs.decode))
    p, d = cfg.pair_for_decode(held[1])
    if held[0]:
        p = min(max(held[0], cfg.min_prefill), cfg.max_prefill)
    return ServiceState(target_prefill=p, target_decode=d)


def _schedule_pair(cfg: PolicyConfig, now_s: float) -> tuple[int, int] | None:
    second = now_s % SECONDS_PER_DAY
    for window in cfg.schedule:
        if window.contains(second):
            ratio = window.prefill_per_decode
            num_decode = max(1, math.floor(window.total_instances / (1 + ratio) + 1e-9))
            return cfg.pair_for_decode(num_decode, ratio)
    return None


def _latency_breach(cfg: PolicyConfig, obs: ServiceObservation | None, now_s: float) -> float | None:
    if obs is None:
        return None
    ratios = []
    for signal, slo in ((obs.tbt_s, cfg.tbt_slo_s), (obs.ttft_s, cfg.ttft_slo_s)):
        value = signal.fresh(now_s, cfg.staleness_limit_s)
        if slo is not None and value is not None:
            ratios.append(value / slo)
    return max(ratios) if ratios else None


def _decision(action: Action, reason: Reason, state: ServiceState, cfg: PolicyConfig, diag: dict,
              withdraw: tuple[int, int] = (0, 0)) -> ServiceDecision:
    """`diag`: the `Diagnostics` fields gathered on the way (built once, here)."""
    if cfg.adaptive_ratio:
        diag = {**diag, "prefill_per_decode": current_ratio(cfg, state)}
    return ServiceDecision(action=action, reason=reason, target_prefill=state.target_prefill,
                           target_decode=state.target_decode, withdraw_prefill=withdraw[0],
                           withdraw_decode=withdraw[1], advisory=cfg.advisory, diagnostics=Diagnostics(**diag))


def _scale_in(cfg: PolicyConfig, st: ServiceState, pair: tuple[int, int], now_s: float, reason: Reason,
              diag: dict, ratio: float | None = None) -> tuple[ServiceDecision, ServiceState]:
    """Start a soft scale-in towards `pair` (or finish it at once when the observation window is 0). A role that
    grows in the same step (a schedule raised the ratio) grows now; only the shrinking roles are withdrawn.
    `ratio`: the adaptive ratio `pair` was sized at, in force once the withdrawn instances are terminated."""
    to_ratio = holding_ratio(cfg, pair, ratio) if cfg.adaptive_ratio and ratio is not None else None
    if cfg.soft_scale_in_window_s == 0:
        new = evolve(st, target_prefill=pair[0], target_decode=pair[1], last_scale_in_s=now_s,
                     prefill_per_decode=to_ratio if to_ratio is not None else st.prefill_per_decode)
        return _decision(Action.SCALE_IN, reason, new, cfg, diag), new
    keep = (max(st.target_prefill, pair[0]), max(st.target_decode, pair[1]))
    soft = SoftScaleIn(now_s, keep[0], keep[1], pair[0], pair[1], to_ratio)
    new = evolve(st, target_prefill=keep[0], target_decode=keep[1], soft=soft)
    withdraw = (keep[0] - pair[0], keep[1] - pair[1])
    return _decision(Action.SCALE_IN, reason, new, cfg, diag, withdraw), new


def _scale_out(cfg: PolicyConfig, st: ServiceState, pair: tuple[int, int], now_s: float, reason: Reason,
               diag: dict, latency: bool = False, ratio: float | None = None
               ) -> tuple[ServiceDecision, ServiceState]:
    """Grow to `pair`. With the adaptive ratio no role shrinks here, and the ratio put in force is `ratio` (the
    one `pair` was sized at) if the grown targets hold at it, else the lowest they hold at (P/D)."""
    in_force = st.prefill_per_decode
    if cfg.adaptive_ratio:
        pair = (max(pair[0], st.target_prefill), max(pair[1], st.target_decode))
        ratio = current_ratio(cfg, st) if ratio is None else ratio
        in_force = holding_ratio(cfg, pair, ratio)
    new = evolve(st, target_prefill=pair[0], target_decode=pair[1], last_scale_out_s=now_s,
                 last_latency_step_s=now_s if latency else st.last_latency_step_s, prefill_per_decode=in_force)
    return _decision(Action.SCALE_OUT, reason, new, cfg, diag), new


def _resolve_soft(cfg: PolicyConfig, st: ServiceState, tps: float | None, breach: float | None, now_s: float,
                  diag: dict, stalled: bool, prefill_tps: float | None = None, burst: bool = False,
                  forecast: float | None = None) -> tuple[ServiceDecision, ServiceState]:
    """Restore the withdrawn replicas, terminate them, or keep observing. A restore names its first cause: requests
    queue (`burst`: withdrawn replicas are the first capacity back, no start-up), an SLO breach, the load back
    (decode or, adaptive, prefill), or a forecast ramp within one start-up (`forecast`, the demand ahead)."""
    soft = st.soft
    withdraw = (soft.from_prefill - soft.to_prefill, soft.from_decode - soft.to_decode)
    if soft.forced:  # a budget cut: out of routing for one period (in-flight requests drain), then terminated
        if now_s <= soft.started_s:
            return _decision(Action.HOLD, Reason.BUDGET_LIMITED, st, cfg, diag, withdraw), st
        new = evolve(st, target_prefill=soft.to_prefill, target_decode=soft.to_decode, soft=None,
                     last_scale_in_s=now_s,
                     prefill_per_decode=soft.to_ratio if soft.to_ratio is not None else st.prefill_per_decode)
        return _decision(Action.TERMINATE_WITHDRAWN, Reason.BUDGET_LIMITED, new, cfg, diag), new
    first_tier = cfg.latency_tiers[0].slo_multiple if cfg.latency_tiers else 1.0

    def above(decode_tps: float | None) -> bool:  # more than the kept decode replicas serve (schedule alone: no)
        return cfg.mode is not Mode.PERIODIC and decode_tps is not None and \
            decode_tps / cfg.target_decode_tps_per_instance > soft.to_decode * (1 + cfg.hysteresis_band)

    load_back = above(tps)
    if cfg.adaptive_ratio and prefill_tps is not None and withdraw[0] > 0:  # prefill's own demand came back
        load_back = load_back or prefill_tps / cfg.target_prefill_tps_per_instance > \
            soft.to_prefill * (1 + cfg.hysteresis_band)
    causes = ((burst, Reason.BURST), (breach is not None and breach > first_tier, Reason.SOFT_SCALE_IN_SLO_DEGRADED),
              (load_back, Reason.LOAD_RETURNED), (above(forecast), Reason.FORECAST))
    reason = next((r for cause, r in causes if cause), None)
    if reason is not None:
        new = evolve(st, target_prefill=soft.from_prefill, target_decode=soft.from_decode, soft=None,
                     last_scale_in_s=now_s)
        return _decision(Action.RESTORE, reason, new, cfg, diag), new
    if tps is None:  # terminating is a scale-in: it needs fresh decode TPS, whatever latency says
        reason = Reason.NO_DECODE_PROGRESS if stalled else Reason.NO_DATA
        return _decision(Action.HOLD, reason, st, cfg, diag, withdraw), st
    if now_s - soft.started_s >= cfg.soft_scale_in_window_s:
        new = evolve(st, target_prefill=soft.to_prefill, target_decode=soft.to_decode, soft=None,
                     last_scale_in_s=now_s,
                     prefill_per_decode=soft.to_ratio if soft.to_ratio is not None else st.prefill_per_decode)
        return _decision(Action.TERMINATE_WITHDRAWN, Reason.SOFT_SCALE_IN_DONE, new, cfg, diag), new
    return _decision(Action.HOLD, Reason.SOFT_SCALE_IN_OBSERVING, st, cfg, diag, withdraw), st


def _latency_step(cfg: PolicyConfig, st: ServiceState, breach: float | None, now_s: float, ratio: float
                  ) -> tuple[Reason, tuple[int, int]] | None:
    if breach is None or _elapsed(now_s, st.last_latency_step_s) < cfg.latency_cooldown_s:
        return None
    tier_index = max((i for i, t in enumerate(cfg.latency_tiers) if breach > t.slo_multiple), default=None)
    if tier_index is None:
        return None
    tier = cfg.latency_tiers[tier_index]
    reason = Reason.LATENCY_SEVERE if tier_index == len(cfg.latency_tiers) - 1 and tier_index > 0 \
        else Reason.LATENCY_MODERATE
    num_decode = max(st.target_decode + 1, math.ceil(st.target_decode * (1 + tier.step_fraction) - 1e-9))
    return reason, cfg.pair_for_decode(num_decode, ratio)


def decide_service(cfg: PolicyConfig, st: ServiceState | None, obs: ServiceObservation | None, now_s: float
                   ) -> tuple[ServiceDecision, ServiceState]:
    """One service's decision. Never raises on bad telemetry: missing, NaN or stale data holds."""
    st = st or _initial_state(cfg, obs)
    current = (st.target_prefill, st.target_decode)
    tps = None if obs is None else obs.decode_tps.fresh(now_s, cfg.staleness_limit_s)
    breach = _latency_breach(cfg, obs, now_s)
    diag = {"decode_tps": tps, "latency_breach": breach}  # the decision's `Diagnostics`, built once (`_decision`)
    admitted = None if obs is None else obs.admitted_rps.fresh(now_s, cfg.staleness_limit_s)
    stalled = tps == 0 and admitted is not None and admitted > 0
    if stalled:  # requests went in and no token came out: the zero is missing data, not an idle service
        tps = None
        diag.update(decode_tps=None, note=f"{admitted:.2f} requests/s admitted, 0 decode tokens/s")
    prefill_tps = None
    if cfg.adaptive_ratio and obs is not None:
        prefill_tps = obs.prefill_kv_miss_tps.fresh(now_s, cfg.staleness_limit_s)
        st = estimate_ratio(cfg, st, tps, prefill_tps, now_s)
        diag.update(prefill_kv_miss_tps=prefill_tps, ratio_estimate=st.ratio_estimate)
    ratio, wanted = current_ratio(cfg, st), wanted_ratio(cfg, st)
    forecast = None
    if cfg.forecast_period_s is not None and tps is not None:
        st, forecast = _forecast(cfg, st, obs, tps, now_s)
        if forecast is not None:
            diag.update(forecast_decode_tps=forecast, forecast_error=st.profile.error)

    burst = _burst(cfg, obs, now_s)
    if burst is not None:
        diag["note"] = f"{burst:.1f} requests queued per ready decode replica"
    if current[0] < cfg.min_prefill or current[1] < cfg.min_decode:
        # a preemption took this service below its own minimum: ask for it back (placed where room is left)
        back = (max(current[0], cfg.min_prefill), max(current[1], cfg.min_decode))
        new = evolve(st, target_prefill=back[0], target_decode=back[1], soft=None, last_scale_out_s=now_s)
        return _decision(Action.SCALE_OUT, Reason.RECLAIM, new, cfg, diag), new
    if st.soft is not None:
        # a forecast ramp within one start-up brings the withdrawn replicas back like returning load
        return _resolve_soft(cfg, st, tps, breach, now_s, diag, stalled, prefill_tps, burst is not None, forecast)

    # --- what the signals ask for ------------------------------------------------------------------------------
    schedule = _schedule_pair(cfg, now_s) if cfg.mode is not Mode.METRICS else None
    desired: tuple[int, int] | None = None
    reason = Reason.PROPORTIONAL
    dampen = True
    if cfg.mode is Mode.PERIODIC:
        desired, reason, dampen = schedule, Reason.SCHEDULE, False
    elif tps is not None:
        raw = tps / cfg.target_decode_tps_per_instance
        ahead = None if forecast is None else forecast / cfg.target_decode_tps_per_instance
        if ahead is not None and ahead > raw:  # demand a start-up ahead floors what is sized now
            if math.ceil(ahead - 1e-9) > math.ceil(raw - 1e-9):
                # it asks for more decode replicas than now does: not dampened; like a schedule, it is the
                # history's answer, not a spike
                reason, dampen = Reason.FORECAST, False
            # else the same decode count, but prefill sizes from the fractional demand: without the floor a
            # pending prefill the forecast wants was cancelled and asked for again a tick later (the demo)
            raw = ahead
        diag.update(desired_decode_raw=raw, ratio_to_current=raw / st.target_decode)
        # a hold the forecast asked for (the load alone asks fewer decode replicas) keeps reason FORECAST
        settled = Reason.FORECAST if reason is Reason.FORECAST else Reason.WITHIN_BAND
        # The band holds only while decode meets its SLO: a decode pool past its SLO capacity serves (and
        # reports) at most that capacity, which a target close under it leaves inside the band, so demand above
        # the current size with TBT over its SLO acts (below the safety net's first tier, a fixed step).
        in_band = abs(raw / st.target_decode - 1) <= cfg.hysteresis_band
        tbt = None if obs is None or cfg.tbt_slo_s is None else obs.tbt_s.fresh(now_s, cfg.staleness_limit_s)
        saturated = raw > st.target_decode and tbt is not None and tbt > cfg.tbt_slo_s
        if in_band and saturated:
            in_band = False
            diag["note"] = f"TBT {tbt / cfg.tbt_slo_s:.3f} x its SLO, {raw:.2f} decode instances of demand: " \
                           "out of band"
        if saturated:
            # Demand above the size while decode misses its SLO is not a noisy reading to step towards: every
            # request of the pool misses now, and the demand (shed load counted) is what it must carry. A dampened
            # step left a 2x spike a start-up short of its capacity (docs/design.md, issue 22, fifth part).
            dampen = False
        if tps == 0:
            desired, reason, dampen = cfg.pair_for_demand(0.0, ratio), Reason.ZERO_TRAFFIC, False
        elif in_band and wanted == ratio:
            desired, reason = current, settled
        elif in_band:  # decode holds; the ratio moved
            desired = (prefill_in_band(cfg, raw, st.target_decode, wanted), st.target_decode)
            reason = Reason.RATIO if desired != current else settled
        else:
            unclamped = math.ceil(raw - 1e-9)
            desired = cfg.pair_for_demand(raw, wanted)
            if desired == current and cfg.min_decode <= unclamped <= cfg.max_decode:
                reason = settled  # outside the band, but it rounds to the current size
                diag["note"] = f"{raw:.2f} decode instances round to the current {current[1]}"
            elif desired[1] == current[1] and desired != current and wanted != ratio:
                reason = Reason.RATIO  # decode rounds to its size (or sits at a bound): only the ratio moved
    if schedule is not None and cfg.mode is Mode.METRICS_WITH_SCHEDULE_FLOOR:
        # The schedule is a floor: it lifts the metrics' answer, and without data it may only lift the size.
        floor_base = current if desired is None else desired
        if schedule[1] > floor_base[1]:
            desired, reason, dampen = schedule, Reason.SCHEDULE, False

    # --- latency safety net: scale out only, overrides a hold or a scale-in ----------------------------------------
    starting = obs is not None and (obs.prefill.pending > 0 or obs.decode.pending > 0)
    step = None if starting else _latency_step(cfg, st, breach, now_s, wanted)  # capacity on its way: wait
    if step is not None:
        latency_reason, pair = step
        asked = desired or current
        if pair == current:  # at the max bound: nothing to add, and latency still forbids a scale-in
            if asked[1] <= current[1]:
                return _decision(Action.HOLD, Reason.AT_BOUND, st, cfg, {**diag, "note": "latency step at max"}), st
        elif pair[1] > asked[1]:
            return _scale_out(cfg, st, pair, now_s, latency_reason, diag, latency=True, ratio=wanted)

    # --- burst path: requests queue now; do not wait for the rate window (or a latency breach) ------------------
    if burst is not None:
        if not starting and _elapsed(now_s, st.last_latency_step_s) >= cfg.latency_cooldown_s:
            severe = cfg.latency_tiers[-1].step_fraction if cfg.latency_tiers else 0.2
            pair = cfg.pair_for_decode(max(st.target_decode + 1, math.ceil(st.target_decode * (1 + severe) - 1e-9)),
                                       wanted)
            if pair[1] > (desired or current)[1]:
                return _scale_out(cfg, st, pair, now_s, Reason.BURST, diag, latency=True, ratio=wanted)
        if desired is not None and desired[1] < current[1]:  # never a scale-in while requests queue
            return _decision(Action.HOLD, Reason.BURST, st, cfg, diag), st

    if desired is None:
        note = "no schedule window covers now" if cfg.mode is Mode.PERIODIC else diag.get("note", "")
        hold_reason = Reason.SCHEDULE if cfg.mode is Mode.PERIODIC else \
            Reason.NO_DECODE_PROGRESS if stalled else Reason.NO_DATA
        return _decision(Action.HOLD, hold_reason, st, cfg, {**diag, "note": note}), st
    if desired == current:
        return _decision(Action.HOLD, Reason.AT_BOUND if reason is Reason.PROPORTIONAL else reason, st, cfg, diag), st

    # --- act: cooldowns, dampening --------------------------------------------------------------------------------
    max_step = max(1, math.floor(st.target_decode * cfg.max_step_fraction))
    if cfg.max_step_count is not None:
        max_step = min(max_step, cfg.max_step_count)
    grows = desired[1] > current[1] or (desired[1] == current[1] and desired[0] > current[0])
    if cfg.adaptive_ratio:  # any role that grows makes it a scale-out, in which nothing shrinks
        grows = desired[0] > current[0] or desired[1] > current[1]
    if grows:
        if reason is not Reason.SCHEDULE and _elapsed(now_s, st.last_scale_out_s) < cfg.scale_out_cooldown_s:
            return _decision(Action.HOLD, Reason.COOLDOWN, st, cfg, diag), st
        if dampen and desired[1] - current[1] > max_step:
            desired, diag = cfg.pair_for_decode(current[1] + max_step, wanted), {**diag, "dampened": True}
        return _scale_out(cfg, st, desired, now_s, reason, diag, ratio=wanted)
    since_last = min(_elapsed(now_s, st.last_scale_in_s), _elapsed(now_s, st.last_scale_out_s))
    if reason is not Reason.SCHEDULE and since_last < cfg.scale_in_cooldown_s:
        return _decision(Action.HOLD, Reason.COOLDOWN, st, cfg, diag), st
    if dampen and current[1] - desired[1] > max_step:
        desired, diag = cfg.pair_for_decode(current[1] - max_step, wanted), {**diag, "dampened": True}
        if cfg.adaptive_ratio:  # a scale-in never grows a role (a ratio that rose grows prefill in a scale-out)
            desired = (min(desired[0], current[0]), desired[1])
    if cfg.adaptive_ratio and wanted > ratio and cfg.soft_scale_in_window_s == 0:
        # a hard scale-in never raises the ratio: groups only shrink in it, and may hold no one higher ratio after
        # the cut; it cuts at the ratio in force, and the next cycle's scale-out grows prefill to the wanted one
        desired, wanted = (min(cfg.pair_for_decode(desired[1], ratio)[0], current[0]), desired[1]), ratio
    # Replicas still starting hold no request: a scale-in lowers the targets by them first, at once (Serve stops
    # replicas that are not running first), and withdraws no ready one meanwhile -- withdrawing the last ready
    # replica of a role while its replacements start left nothing routable. The rest waits for the next cycle.
    starting_counts = (0, 0) if obs is None else (obs.prefill.pending, obs.decode.pending)
    cut = tuple(want if want >= have else max(want, have - pending)  # a role that grows grows now
                for want, have, pending in zip(desired, current, starting_counts))
    if any(c < have for c, have in zip(cut, current)):
        new = evolve(st, target_prefill=cut[0], target_decode=cut[1], last_scale_in_s=now_s)
        return _decision(Action.SCALE_IN, Reason.CANCEL_STARTING, new, cfg, diag), new
    return _scale_in(cfg, st, desired, now_s, reason, diag, ratio=wanted)


def _grant(cfg: PolicyConfig, want_d: int, ratio: float, allowance: float, floor: tuple[int, int]
           ) -> tuple[int, int]:
    """The largest (P, D) at the ratio, from `want_d` down, whose GPUs above the floor's fit `allowance`."""
    floor_gpus = cfg.gpus(*floor)
    for d in range(want_d, max(floor[1], cfg.min_decode) - 1, -1):
        pair = cfg.pair_for_decode(d, ratio)
        if cfg.gpus(*pair) - floor_gpus <= allowance + 1e-9:
            return pair
    return floor


SHARE_HYSTERESIS = 0.1  # a service runs up to this much of its ask over its budget share (or one pair) uncut


def _running(st: ServiceState) -> tuple[int, int]:
    """What a service runs: a soft scale-in's replicas before the cut, else its targets."""
    return (st.soft.from_prefill, st.soft.from_decode) if st.soft else (st.target_prefill, st.target_decode)


def _keep_near_share(services: Mapping[str, PolicyConfig], decisions: Mapping[str, ServiceDecision],
                     grants: dict[str, tuple[int, int]], floors: Mapping[str, tuple[int, int]],
                     ratios: Mapping[str, float], asks: Mapping[str, int], room: int,
                     running: Mapping[str, tuple[int, int]]) -> None:
    """Hysteresis on one priority's proportional shares (in place): a service whose grant would cut what it runs
    by at most `SHARE_HYSTERESIS` of its ask (or one decode instance with its prefill) keeps what it runs, and
    the services of its priority that grow take less (never less than they run), while the priority still fits
    `room`. Without it every tick's small shift of demand between equal priorities moved a pair from one to
    another: a forced soft scale-in of one and a scale-out of the other (1,386 cuts a day on `paper-fleet`)."""
    def above(n: str, pair: tuple[int, int]) -> int:
        return services[n].gpus(*pair) - services[n].gpus(*floors[n])

    kept = {}
    for n, grant in grants.items():
        if n not in asks or not (running[n][0] > grant[0] or running[n][1] > grant[1]):
            continue
        cfg, run = services[n], above(n, running[n])
        step = cfg.gpus(*cfg.pair_for_decode(running[n][1], ratios[n])) - \
            cfg.gpus(*cfg.pair_for_decode(running[n][1] - 1, ratios[n]))
        if run <= asks[n] and run - above(n, grant) <= max(step, SHARE_HYSTERESIS * asks[n]):
            kept[n] = running[n]
    if not kept:
        return
    trial = {**grants, **kept}
    excess = sum(above(n, trial[n]) for n in asks) - room
    growers = sorted((n for n in asks if n not in kept and trial[n][0] >= running[n][0]
                      and trial[n][1] >= running[n][1] and above(n, trial[n]) > above(n, running[n])),
                     key=lambda n: (above(n, running[n]) - above(n, trial[n]), n))
    for n in growers:  # the largest growth gives first
        if excess <= 0:
            break
        less = _grant(services[n], decisions[n].target_decode, ratios[n], above(n, trial[n]) - excess, floors[n])
        if less[0] < running[n][0] or less[1] < running[n][1]:
            less = running[n]
        excess -= above(n, trial[n]) - above(n, less)
        trial[n] = less
    if excess <= 0:
        grants.update(trial)


def _apply_budget(config: FleetConfig, decisions: dict[str, ServiceDecision], states: dict[str, ServiceState],
                  before: dict[str, ServiceState], now_s: float) -> None:
    """Cut targets until the fleet fits `gpu_budget` (in place): every service keeps its floor
    (`PolicyConfig.fleet_floor`); what is left goes to higher priorities first, and within one priority in
    proportion to what each asks above its floor (rounded down to whole pairs; what rounding leaves goes to the
    largest shortfalls against the proportional share first).
    A cut below what a service runs (`before`: its state before this decision) is a forced soft scale-in: the
    replicas over the grant leave routing now and are terminated next period, never restored, so the budget
    they held goes to the higher priorities that asked for it."""
    budget = config.gpu_budget
    services = config.services
    total = sum(services[n].gpus(d.target_prefill, d.target_decode) for n, d in decisions.items())
    if budget is None or total <= budget:
        return
    floors = {n: services[n].fleet_floor() for n in decisions}
    remaining = budget - sum(services[n].gpus(*floors[n]) for n in decisions)
    grants: dict[str, tuple[int, int]] = {}
    for priority in sorted({services[n].priority for n in decisions}, reverse=True):
        names = sorted(n for n in decisions if services[n].priority == priority)
        ratios = {n: current_ratio(services[n], states[n]) for n in names}
        asks = {n: max(0, services[n].gpus(decisions[n].target_prefill, decisions[n].target_decode)
                       - services[n].gpus(*floors[n])) for n in names}
        share = min(1.0, remaining / sum(asks.values())) if sum(asks.values()) else 1.0
        for n in names:
            grants[n] = _grant(services[n], decisions[n].target_decode, ratios[n], asks[n] * share, floors[n])
        spent = lambda n: services[n].gpus(*grants[n]) - services[n].gpus(*floors[n])  # noqa: E731
        left = remaining - sum(spent(n) for n in names)
        for n in sorted(names, key=lambda n: (spent(n) - asks[n] * share, n)):  # what rounding left: largest
            # shortfall against the proportional share first
            grants[n] = _grant(services[n], decisions[n].target_decode, ratios[n], spent(n) + left, floors[n])
            left = remaining - sum(spent(k) for k in names)
        _keep_near_share(services, decisions, grants, floors, ratios, asks, remaining,
                         {n: _running(before.get(n) or states[n]) for n in names})
        remaining = max(0, remaining - sum(spent(n) for n in names))
    for name, grant in grants.items():
        cfg, dec, st = services[name], decisions[name], states[name]
        if grant == (dec.target_prefill, dec.target_decode):
            continue
        old = before.get(name) or st
        running = _running(old)
        diag = {**vars(dec.diagnostics), "budget_gpus": budget,
                "note": f"wanted {dec.target_prefill}P/{dec.target_decode}D"}
        if grant[0] >= running[0] and grant[1] >= running[1]:  # growth capped: what runs stays
            new = evolve(st, target_prefill=grant[0], target_decode=grant[1], soft=None)
            action = Action.HOLD if grant == running else Action.SCALE_OUT
            decisions[name], states[name] = _decision(action, Reason.BUDGET_LIMITED, new, cfg, diag), new
            continue
        if old.soft is not None and grant[0] >= old.soft.to_prefill and grant[1] >= old.soft.to_decode:
            # a scale-in in progress goes below the grant: what it withdrew over the grant is terminated at once,
            # the rest of it goes on from the grant
            new = evolve(old, target_prefill=grant[0], target_decode=grant[1],
                         soft=evolve(old.soft, from_prefill=grant[0], from_decode=grant[1]))
            states[name] = new
            decisions[name] = _decision(Action.SCALE_IN, Reason.BUDGET_LIMITED, new, cfg, diag,
                                        (grant[0] - old.soft.to_prefill, grant[1] - old.soft.to_decode))
            continue
        # a cut below what runs: withdraw now (roles over the grant), terminate next period (a role under its
        # grant keeps what it runs: the budget never grows one role of a service it is cutting)
        to = (min(grant[0], running[0]), min(grant[1], running[1]))
        soft = SoftScaleIn(now_s, running[0], running[1], to[0], to[1], old.soft.to_ratio if old.soft else None,
                           forced=True)
        new = evolve(old, target_prefill=running[0], target_decode=running[1], soft=soft)
        states[name] = new
        decisions[name] = _decision(Action.SCALE_IN, Reason.BUDGET_LIMITED, new, cfg, diag,
                                    (running[0] - to[0], running[1] - to[1]))


class HeteroScalePolicy:
    """Decode-TPS proportional control with latency safety net, soft scale-in, schedule and budget."""

    def decide(self, state: PolicyState, observation: Observation, now_s: float, config: FleetConfig
               ) -> tuple[Decision, PolicyState]:
        decisions: dict[str, ServiceDecision] = {}
        states: dict[str, ServiceState] = {}
        for name in sorted(config.services):
            decisions[name], states[name] = decide_service(config.services[name], state.services.get(name),
                                                           observation.services.get(name), now_s)
        _apply_budget(config, decisions, states, dict(state.services), now_s)
        return Decision(services=decisions), PolicyState(services=states, preemptions=state.preemptions)


_DEFAULT = HeteroScalePolicy()


def decide(state: PolicyState, observation: Observation, now_s: float, config: FleetConfig
           ) -> tuple[Decision, PolicyState]:
    """Decide every service in one call (see module docstring). Pure and deterministic."""
    return _DEFAULT.decide(state, observation, now_s, config)
