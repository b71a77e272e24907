"""The P:D ratio a service runs at: the configured one (the paper's), a schedule window's, or the adaptive one.

Adaptive ratio (when `target_prefill_tps_per_instance` is set; otherwise the ratio is the configured one, as in
the paper). Decode demand is x = decode tokens/s / decode target, prefill demand y = KV-miss prefill tokens/s
/ prefill target (both targets SLO-feasible, from the stress test); the ratio the workload asks for is y / x,
clipped to `ratio_bounds`. Its estimate rises at once (prefill short of its demand costs TTFT now) and falls
with time constant `ratio_window_s` (a prompt-heavy spell is not forgotten in one quiet window). The ratio in
force moves to the estimate only when the estimate leaves +/- `ratio_hysteresis` of it. Invariants:
- both pools still move in one decision; a decision's targets hold at the ratio it puts in force
  (`PolicyConfig.ratio_holds`), so every DG is kept inside that ratio's band by `place()`;
- a ratio that rises grows prefill at once (a scale-out: decode never shrinks in it); a ratio that falls sheds
  prefill only through a soft scale-in, and is in force only once the withdrawn prefill is terminated (until
  then the old ratio's band holds the groups); a scale-out never cuts either role: where decode grows while
  the ratio falls, prefill stays and the ratio put in force is the lowest that the new targets hold at;
- missing prefill or decode tokens/s leaves the estimate where it was.

Pure: no Ray, vLLM, clock or environment.
"""

from __future__ import annotations

import math

from autoscaler.frozen import evolve
from autoscaler.model import Mode, PolicyConfig, ServiceState
from placement.scheduler import prefill_band

SECONDS_PER_DAY = 86_400.0


def current_ratio(cfg: PolicyConfig, st: ServiceState | None) -> float:
    """The P:D ratio in force for a service: the adaptive one its state holds, else the configured one."""
    return st.prefill_per_decode if st is not None and st.prefill_per_decode is not None else cfg.prefill_per_decode


def estimate_ratio(cfg: PolicyConfig, st: ServiceState, tps: float | None, prefill_tps: float | None,
                    now_s: float) -> ServiceState:
    """The smoothed ratio the workload asks for (module docstring); unchanged without both signals."""
    if not cfg.adaptive_ratio or not tps or prefill_tps is None:
        return st
    lo, hi = cfg.ratio_bounds
    instant = (prefill_tps / cfg.target_prefill_tps_per_instance) / (tps / cfg.target_decode_tps_per_instance)
    instant = min(max(instant, lo), hi)
    old = st.ratio_estimate
    if old is None or instant >= old or st.ratio_sampled_s is None:
        estimate = instant
    else:
        dt = max(0.0, now_s - st.ratio_sampled_s)
        alpha = 1.0 if cfg.ratio_window_s == 0 else 1.0 - math.exp(-dt / cfg.ratio_window_s)
        estimate = old + alpha * (instant - old)
    return evolve(st, ratio_estimate=estimate, ratio_sampled_s=now_s)


def wanted_ratio(cfg: PolicyConfig, st: ServiceState) -> float:
    """The ratio this decision sizes at: the estimate once it leaves the hysteresis band of the one in force."""
    ratio = current_ratio(cfg, st)
    est = st.ratio_estimate
    if cfg.adaptive_ratio and est is not None and abs(est / ratio - 1) > cfg.ratio_hysteresis:
        return est
    return ratio


def prefill_in_band(cfg: PolicyConfig, decode_demand: float, num_decode: int, ratio: float) -> int:
    """Prefill for `decode_demand` at `ratio`, kept inside the ratio band of `num_decode` decode instances."""
    lo, hi = prefill_band(num_decode, ratio)
    p = min(max(math.ceil(decode_demand * ratio - 1e-9), lo), hi)
    return min(max(p, cfg.min_prefill), cfg.max_prefill)


def holding_ratio(cfg: PolicyConfig, pair: tuple[int, int], ratio: float) -> float:
    """`ratio` if the targets `pair` hold at it, else P/D (which they always hold at)."""
    return ratio if cfg.ratio_holds(*pair, ratio) else pair[0] / pair[1]


def ratio_in_force(cfg: PolicyConfig, now_s: float, num_prefill: int, num_decode: int,
                   state: ServiceState | None = None) -> float:
    """The P:D ratio a service's targets were sized at, which every deployment group is kept at (each inside
    `placement.scheduler.prefill_band` of it): the adaptive ratio in force (`state`), the schedule window's
    where a schedule set targets that follow it, else the policy's own. Never the targets' quotient: P =
    ceil(D x r) swings P/D by up to 1/D from one size to the next, and groups that each need one prefill push
    it up further, so a band on the quotient moves under groups that did not change."""
    if cfg.adaptive_ratio:
        return current_ratio(cfg, state)
    if cfg.mode is not Mode.METRICS and not cfg.ratio_holds(num_prefill, num_decode):
        second = now_s % SECONDS_PER_DAY
        for window in cfg.schedule:
            if window.contains(second) and cfg.ratio_holds(num_prefill, num_decode, window.prefill_per_decode):
                return window.prefill_per_decode
    return cfg.prefill_per_decode
