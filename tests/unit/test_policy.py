"""Scenario table (like the Kubernetes HPA's replica-calculator tests) covering every Reason, plus properties."""

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.model import (
    Action,
    FleetConfig,
    LatencyTier,
    Mode,
    Observation,
    PolicyConfig,
    PolicyState,
    Reason,
    RoleCounts,
    ScheduleWindow,
    ServiceObservation,
    ServiceState,
    Signal,
    SoftScaleIn,
)
from autoscaler.policy import decide, decide_service

NOW = 10_000.0
# The paper-scale timings these scenarios are written against (minutes, not the small-cluster defaults)
CFG = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=1 / 3, max_prefill=10, max_decode=30,
                   tbt_slo_s=0.05, ttft_slo_s=1.0, scale_out_cooldown_s=180.0, scale_in_cooldown_s=600.0,
                   latency_cooldown_s=60.0, soft_scale_in_window_s=300.0, staleness_limit_s=60.0)


def obs(tps=None, age=0.0, tbt=None, ttft=None, admitted=None):
    sig = lambda v: Signal(v, NOW - age) if v is not None else Signal()  # noqa: E731
    return ServiceObservation(decode_tps=sig(tps), tbt_s=sig(tbt), ttft_s=sig(ttft), admitted_rps=sig(admitted))


def state(p=2, d=6, out=None, in_=None, soft=None, lat=None):
    return ServiceState(p, d, last_scale_out_s=out, last_scale_in_s=in_, soft=soft, last_latency_step_s=lat)


SOFT = SoftScaleIn(started_s=NOW - 100, from_prefill=2, from_decode=6, to_prefill=1, to_decode=3)

# name, state, observation, expected (action, reason, P, D, withdraw P, withdraw D)
SCENARIOS = [
    ("steady load holds", state(), obs(600), (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("flapping just inside the band holds", state(), obs(655), (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("flapping just inside the band (low side)", state(), obs(545), (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("ramp up scales both pools", state(), obs(800), (Action.SCALE_OUT, Reason.PROPORTIONAL, 3, 8, 0, 0)),
    # a saturated decode pool reports its capacity, which a target just under it leaves inside the band
    ("TBT over its SLO with demand above the size leaves the band", state(), obs(640, tbt=0.052),
     (Action.SCALE_OUT, Reason.PROPORTIONAL, 3, 7, 0, 0)),
    ("TBT over its SLO with demand at the size holds", state(), obs(590, tbt=0.052),
     (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("TTFT over its SLO (below the first tier) keeps the band", state(), obs(640, ttft=1.04),
     (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("spike is dampened to +50 %", state(), obs(3000), (Action.SCALE_OUT, Reason.PROPORTIONAL, 3, 9, 0, 0)),
    # every request of a saturated pool misses now: the demand is sized in one step, not stepped towards
    ("a spike with decode past its TBT SLO is not dampened", state(), obs(3000, tbt=0.052),
     (Action.SCALE_OUT, Reason.PROPORTIONAL, 10, 30, 0, 0)),
    ("ramp down withdraws first", state(), obs(300), (Action.SCALE_IN, Reason.PROPORTIONAL, 2, 6, 1, 3)),
    ("scale-out cooldown", state(out=NOW - 100), obs(800), (Action.HOLD, Reason.COOLDOWN, 2, 6, 0, 0)),
    ("scale-in cooldown counts from the last scale-out", state(out=NOW - 300), obs(300),
     (Action.HOLD, Reason.COOLDOWN, 2, 6, 0, 0)),
    ("scale-in cooldown", state(in_=NOW - 300), obs(300), (Action.HOLD, Reason.COOLDOWN, 2, 6, 0, 0)),
    ("moderate TBT breach: +10 %", state(), obs(600, tbt=0.06),
     (Action.SCALE_OUT, Reason.LATENCY_MODERATE, 3, 7, 0, 0)),
    ("severe TBT breach: +20 %", state(), obs(600, tbt=0.08), (Action.SCALE_OUT, Reason.LATENCY_SEVERE, 3, 8, 0, 0)),
    ("TTFT breach counts too", state(), obs(600, ttft=1.2), (Action.SCALE_OUT, Reason.LATENCY_MODERATE, 3, 7, 0, 0)),
    ("latency overrides a proportional scale-in", state(), obs(300, tbt=0.06),
     (Action.SCALE_OUT, Reason.LATENCY_MODERATE, 3, 7, 0, 0)),
    ("latency safety net works without TPS", state(), obs(None, tbt=0.08),
     (Action.SCALE_OUT, Reason.LATENCY_SEVERE, 3, 8, 0, 0)),
    ("latency step ignores the scale-out cooldown", state(out=NOW - 10), obs(600, tbt=0.08),
     (Action.SCALE_OUT, Reason.LATENCY_SEVERE, 3, 8, 0, 0)),
    ("repeated latency steps wait for the latency cooldown", state(lat=NOW - 10), obs(600, tbt=0.08),
     (Action.HOLD, Reason.WITHIN_BAND, 2, 6, 0, 0)),
    ("latency step at the max bound holds", state(10, 30), obs(3000, tbt=0.08), (Action.HOLD, Reason.AT_BOUND, 10, 30, 0, 0)),
    ("bigger proportional step beats latency step", state(), obs(900, tbt=0.06),
     (Action.SCALE_OUT, Reason.PROPORTIONAL, 3, 9, 0, 0)),
    ("stale data holds", state(), obs(100, age=120), (Action.HOLD, Reason.NO_DATA, 2, 6, 0, 0)),
    ("NaN holds", state(), obs(math.nan), (Action.HOLD, Reason.NO_DATA, 2, 6, 0, 0)),
    ("negative rate holds", state(), obs(-5.0), (Action.HOLD, Reason.NO_DATA, 2, 6, 0, 0)),
    ("missing service observation holds", state(), None, (Action.HOLD, Reason.NO_DATA, 2, 6, 0, 0)),
    ("fresh zero traffic goes to the minimum", state(), obs(0.0), (Action.SCALE_IN, Reason.ZERO_TRAFFIC, 2, 6, 1, 5)),
    ("zero traffic at the minimum holds", state(1, 1), obs(0.0), (Action.HOLD, Reason.ZERO_TRAFFIC, 1, 1, 0, 0)),
    ("zero tokens while requests are admitted is missing data", state(), obs(0.0, admitted=3.0),
     (Action.HOLD, Reason.NO_DECODE_PROGRESS, 2, 6, 0, 0)),
    ("zero tokens with nothing admitted is zero traffic", state(), obs(0.0, admitted=0.0),
     (Action.SCALE_IN, Reason.ZERO_TRAFFIC, 2, 6, 1, 5)),
    ("max bound clamps", state(10, 28), obs(10_000), (Action.SCALE_OUT, Reason.PROPORTIONAL, 10, 30, 0, 0)),
    ("at max bound holds", state(10, 30), obs(10_000), (Action.HOLD, Reason.AT_BOUND, 10, 30, 0, 0)),
    ("soft scale-in observing", state(soft=SOFT), obs(300), (Action.HOLD, Reason.SOFT_SCALE_IN_OBSERVING, 2, 6, 1, 3)),
    ("soft scale-in terminates after the window", state(soft=replace(SOFT, started_s=NOW - 301)), obs(300),
     (Action.TERMINATE_WITHDRAWN, Reason.SOFT_SCALE_IN_DONE, 1, 3, 0, 0)),
    ("soft scale-in restores on SLO breach", state(soft=SOFT), obs(300, tbt=0.06),
     (Action.RESTORE, Reason.SOFT_SCALE_IN_SLO_DEGRADED, 2, 6, 0, 0)),
    ("soft scale-in restores when load returns", state(soft=SOFT), obs(600),
     (Action.RESTORE, Reason.LOAD_RETURNED, 2, 6, 0, 0)),
    ("an SLO breach names itself even when the load is back too", state(soft=SOFT), obs(600, tbt=0.06),
     (Action.RESTORE, Reason.SOFT_SCALE_IN_SLO_DEGRADED, 2, 6, 0, 0)),
    ("a scale-in while replicas start cancels those first, at once, withdrawing no ready one",
     state(3, 3), replace(obs(20), decode=RoleCounts(ready=1, pending=2), prefill=RoleCounts(ready=1, pending=2)),
     (Action.SCALE_IN, Reason.CANCEL_STARTING, 1, 2, 0, 0)),  # (dampened to -50 %)
    ("a scale-in deeper than what starts cancels what starts first (the rest next cycle)",
     state(), replace(obs(300), decode=RoleCounts(ready=5, pending=1), prefill=RoleCounts(ready=2)),
     (Action.SCALE_IN, Reason.CANCEL_STARTING, 2, 5, 0, 0)),
    ("soft scale-in never terminates on missing data", state(soft=replace(SOFT, started_s=NOW - 900)),
     obs(None), (Action.HOLD, Reason.NO_DATA, 2, 6, 1, 3)),
]


@pytest.mark.parametrize("name, st0, observation, expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenarios(name, st0, observation, expected):
    decision, _ = decide_service(CFG, st0, observation, NOW)
    got = (decision.action, decision.reason, decision.target_prefill, decision.target_decode,
           decision.withdraw_prefill, decision.withdraw_decode)
    assert got == expected


def test_diagnostics_carry_the_numbers():
    decision, _ = decide_service(CFG, state(), obs(3000), NOW)
    assert decision.diagnostics.decode_tps == 3000 and decision.diagnostics.desired_decode_raw == 30
    assert decision.diagnostics.dampened is True and decision.diagnostics.ratio_to_current == 5


def test_max_step_count_caps_dampening():
    decision, _ = decide_service(replace(CFG, max_step_count=1), state(), obs(3000), NOW)
    assert decision.target_decode == 7


def test_immediate_scale_in_when_observation_window_is_zero():
    decision, new = decide_service(replace(CFG, soft_scale_in_window_s=0), state(), obs(300), NOW)
    assert (decision.action, decision.target_decode, decision.withdraw_decode) == (Action.SCALE_IN, 3, 0)
    assert new.soft is None and new.last_scale_in_s == NOW


def test_soft_scale_in_lifecycle_with_state_threading():
    _, s1 = decide_service(CFG, state(), obs(300), NOW)
    assert s1.soft == SoftScaleIn(NOW, 2, 6, 1, 3)
    d2, s2 = decide_service(CFG, s1, obs(300, age=-299), NOW + 299)
    assert d2.reason is Reason.SOFT_SCALE_IN_OBSERVING
    d3, s3 = decide_service(CFG, s2, obs(300, age=-300), NOW + 300)
    assert (d3.action, d3.target_prefill, d3.target_decode) == (Action.TERMINATE_WITHDRAWN, 1, 3)
    d4, _ = decide_service(CFG, s3, obs(100, age=-400), NOW + 400)
    assert d4.reason is Reason.COOLDOWN  # the scale-in cooldown starts when the instances are terminated


def test_initial_state_comes_from_the_observed_counts():
    observation = replace(obs(600), decode=RoleCounts(ready=5, pending=1), prefill=RoleCounts(ready=2))
    decision, new = decide_service(CFG, None, observation, NOW)
    assert (new.target_prefill, new.target_decode) == (2, 6) and decision.reason is Reason.WITHIN_BAND


def test_periodic_schedule_and_floor():
    windows = (ScheduleWindow(0, 43_200, 8, 1 / 3), ScheduleWindow(43_200, 86_400, 16, 1 / 3))
    periodic = replace(CFG, mode=Mode.PERIODIC, schedule=windows)
    morning = 3 * 86_400 + 3600.0
    decision, _ = decide_service(periodic, state(), obs(None), morning)
    assert (decision.action, decision.reason, decision.target_prefill, decision.target_decode) == \
        (Action.HOLD, Reason.SCHEDULE, 2, 6)  # 8 instances at 1:3 is exactly the current size
    evening = 3 * 86_400 + 50_000.0
    decision, _ = decide_service(periodic, state(), obs(None), evening)
    assert (decision.action, decision.reason, decision.target_prefill, decision.target_decode) == \
        (Action.SCALE_OUT, Reason.SCHEDULE, 4, 12)
    floor = replace(CFG, mode=Mode.METRICS_WITH_SCHEDULE_FLOOR, schedule=windows)
    decision, _ = decide_service(floor, state(), obs(100, age=-50_000 + 10_000), evening)
    assert (decision.reason, decision.target_decode) == (Reason.SCHEDULE, 12)
    decision, _ = decide_service(floor, state(), obs(None), evening)  # no data: the floor may still lift
    assert (decision.reason, decision.target_decode) == (Reason.SCHEDULE, 12)
    gap = replace(CFG, mode=Mode.PERIODIC, schedule=(ScheduleWindow(0, 3600, 4, 1.0),))
    decision, _ = decide_service(gap, state(), obs(600), 7200.0)
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.SCHEDULE)


def test_budget_is_shared_by_priority_and_never_exceeded():
    high = replace(CFG, priority=10)
    low = replace(CFG, priority=0)
    fleet = FleetConfig(services={"high": high, "low": low}, gpu_budget=20)
    start = PolicyState(services={"high": state(), "low": state()})
    observation = Observation(services={"high": obs(900), "low": obs(900)})
    decision, new = decide(start, observation, NOW, fleet)
    h, l_ = decision.services["high"], decision.services["low"]
    assert (h.target_prefill, h.target_decode, h.reason) == (3, 9, Reason.PROPORTIONAL)
    assert l_.reason is Reason.BUDGET_LIMITED
    assert h.target_prefill + h.target_decode + l_.target_prefill + l_.target_decode <= 20
    assert new.services["low"].target_decode == l_.target_decode


def test_equal_priorities_share_the_budget_by_demand_and_a_best_effort_floor_is_zero():
    big = small = replace(CFG, prefill_per_decode=1.0, max_step_fraction=10.0)  # undampened asks
    fleet = FleetConfig(services={"big": big, "small": small}, gpu_budget=12)
    start = PolicyState(services={"big": state(2, 2), "small": state(2, 2)})
    decision, _ = decide(start, Observation(services={"big": obs(1200), "small": obs(400)}), NOW, fleet)
    b, s_ = decision.services["big"], decision.services["small"]
    # asks above the floors (1P+1D each): 22 and 6 GPUs; 8 to share -> 6.3 and 1.7, in whole pairs 6 and 2
    assert (b.target_prefill, b.target_decode) == (4, 4) and (s_.target_prefill, s_.target_decode) == (2, 2)
    vip = replace(big, priority=5)
    fleet = FleetConfig(services={"vip": vip, "be": replace(big, fleet_min_decode=0)}, gpu_budget=10)
    start = PolicyState(services={"vip": state(2, 2), "be": state(2, 2)})
    observation = Observation(services={"vip": obs(1000), "be": obs(400)})
    decision, after = decide(start, observation, NOW, fleet)
    v, e = decision.services["vip"], decision.services["be"]
    assert (v.target_prefill, v.target_decode) == (5, 5)  # the floors: 1P+1D for vip, nothing for best effort
    # best effort is cut below what it runs: all withdrawn now (a forced soft scale-in), terminated next period
    assert (e.action, e.reason, e.withdraw_prefill, e.withdraw_decode) == (Action.SCALE_IN, Reason.BUDGET_LIMITED,
                                                                           2, 2)
    assert after.services["be"].soft.forced
    decision, after = decide(after, observation, NOW + 30, fleet)
    e = decision.services["be"]
    assert (e.action, e.target_prefill, e.target_decode) == (Action.TERMINATE_WITHDRAWN, 0, 0)


def test_a_small_shift_of_demand_between_equal_priorities_cuts_nobody_a_large_one_does():
    """Hysteresis on the budget's shares: both run 10P/10D of a 40-GPU budget; a's demand rises to 13 decode
    instances. The proportional share would move one pair from b to a (a forced cut of b and a scale-out of a,
    every time demand wobbles); within one pair of its share b keeps what it runs and a waits. When a asks 20,
    b's share falls three pairs below what it runs: b is cut."""
    cfg = replace(CFG, prefill_per_decode=1.0, max_step_fraction=10.0, max_prefill=30)
    fleet = FleetConfig(services={"a": cfg, "b": cfg}, gpu_budget=40)
    start = PolicyState(services={"a": state(10, 10), "b": state(10, 10)})
    decision, _ = decide(start, Observation(services={"a": obs(1300), "b": obs(1000)}), NOW, fleet)
    a, b = decision.services["a"], decision.services["b"]
    assert (a.target_prefill, a.target_decode, a.reason) == (10, 10, Reason.BUDGET_LIMITED)
    assert (b.action, b.target_prefill, b.target_decode) == (Action.HOLD, 10, 10)
    decision, _ = decide(start, Observation(services={"a": obs(2000), "b": obs(1000)}), NOW, fleet)
    a, b = decision.services["a"], decision.services["b"]
    assert (b.action, b.reason, b.withdraw_prefill, b.withdraw_decode) == (Action.SCALE_IN, Reason.BUDGET_LIMITED,
                                                                           3, 3)
    assert a.target_prefill + a.target_decode + 14 <= 40


def test_one_services_bad_data_does_not_touch_another():
    fleet = FleetConfig(services={"a": CFG, "b": CFG})
    start = PolicyState(services={"a": state(), "b": state()})
    decision, _ = decide(start, Observation(services={"a": obs(math.nan), "b": obs(800)}), NOW, fleet)
    assert decision.services["a"].reason is Reason.NO_DATA
    assert decision.services["b"].target_decode == 8


def test_advisory_flag_is_carried():
    decision, _ = decide_service(replace(CFG, advisory=True), state(), obs(800), NOW)
    assert decision.advisory and decision.action is Action.SCALE_OUT


@pytest.mark.parametrize("kwargs, message", [
    ({"target_decode_tps_per_instance": 0}, r"target_decode_tps_per_instance \(0\)"),
    ({"target_decode_tps_per_instance": math.nan}, r"target_decode_tps_per_instance \(nan\)"),
    ({"min_decode": 0}, r"min_decode \(0\) must be >= 1"),
    ({"max_decode": 0}, r"max_decode \(0\) must be >= min_decode"),
    ({"max_prefill": 1, "min_decode": 9, "max_decode": 9}, r"max_prefill \(1\) is below"),
    ({"hysteresis_band": 1.5}, r"hysteresis_band \(1.5\)"),
    ({"scale_in_cooldown_s": -1}, r"scale_in_cooldown_s \(-1\)"),
    ({"latency_tiers": (LatencyTier(1.5, 0.2), LatencyTier(1.1, 0.1))}, "strictly increasing"),
    ({"mode": Mode.PERIODIC}, "needs a non-empty schedule"),
    ({"max_step_count": 0}, r"max_step_count \(0\)"),
    ({"fleet_min_decode": 2}, r"fleet_min_decode \(2\) must be an integer from 0 to min_decode \(1\)"),
])
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**{"target_decode_tps_per_instance": 100.0, **kwargs})


def test_budget_below_minimums_is_rejected():
    with pytest.raises(ValueError, match=r"gpu_budget \(3\) is below"):
        FleetConfig(services={"a": CFG, "b": CFG}, gpu_budget=3)
    FleetConfig(services={"a": CFG, "b": replace(CFG, fleet_min_decode=0)}, gpu_budget=2)  # b's floor is zero
    with pytest.raises(ValueError, match=r"gpu_budget_by_type\['H20'\] \(-1\)"):
        FleetConfig(services={"a": CFG}, gpu_budget_by_type={"H20": -1})


# ---- properties -----------------------------------------------------------------------------------------------

values = st.one_of(st.none(), st.just(math.nan), st.floats(min_value=0, max_value=5000), st.just(0.0))
steps = st.lists(st.tuples(values, st.floats(min_value=0, max_value=200), st.floats(min_value=1, max_value=400),
                           st.one_of(st.none(), st.floats(min_value=0, max_value=0.2))), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(steps, st.integers(min_value=10, max_value=60))
def test_invariants_over_random_observation_sequences(sequence, budget):
    fleet = FleetConfig(services={"a": CFG, "b": replace(CFG, priority=1, prefill_per_decode=0.5)}, gpu_budget=budget)
    policy_state, now = PolicyState(), 0.0
    for tps, age, dt, tbt in sequence:
        now += dt
        sample = ServiceObservation(decode_tps=Signal(tps, now - age), tbt_s=Signal(tbt, now))
        observation = Observation(services={"a": sample, "b": sample})
        decision, new_state = decide(policy_state, observation, now, fleet)
        again, again_state = decide(policy_state, observation, now, fleet)
        assert (decision, new_state) == (again, again_state)  # deterministic
        total = 0
        for name, dec in decision.services.items():
            cfg = fleet.services[name]
            assert 0 <= dec.withdraw_prefill <= dec.target_prefill and 0 <= dec.withdraw_decode <= dec.target_decode
            assert cfg.min_decode <= dec.target_decode <= cfg.max_decode
            assert cfg.min_prefill <= dec.target_prefill <= cfg.max_prefill
            assert cfg.ratio_holds(dec.target_prefill, dec.target_decode)  # ceil((D-1)r) <= P <= ceil(Dr)
            # what each keeps once this decision's withdrawals end (a budget cut's withdrawn replicas hold their
            # GPUs one period more; placement never grows past the budget: tests/unit/test_fleet.py)
            total += cfg.gpus(dec.target_prefill - dec.withdraw_prefill, dec.target_decode - dec.withdraw_decode)
            before = policy_state.services.get(name)
            fresh = tps is not None and not math.isnan(tps) and age <= cfg.staleness_limit_s
            if before is not None and not fresh and dec.reason is not Reason.BUDGET_LIMITED:
                assert dec.action not in (Action.SCALE_IN, Action.TERMINATE_WITHDRAWN)  # no scale-in on bad data
                assert dec.target_decode >= before.target_decode
        assert total <= budget
        policy_state = new_state


def test_every_reason_is_covered_by_a_test():
    # RATIO: test_adaptive_ratio.py; FORECAST: test_forecast.py; BURST: test_burst.py; PREEMPTED, RECLAIM:
    # test_fleet.py
    covered = {row[3][1] for row in SCENARIOS} | {Reason.SCHEDULE, Reason.BUDGET_LIMITED, Reason.RATIO,
                                                    Reason.FORECAST, Reason.BURST, Reason.PREEMPTED, Reason.RECLAIM}
    assert covered == set(Reason)


# ---- known bugs (issue 12), each a failing test first ---------------------------------------------------------


def test_a_schedule_that_raises_the_ratio_grows_prefill_now_and_withdraws_only_decode():
    windows = (ScheduleWindow(0, 43_200, 8, 1 / 3), ScheduleWindow(43_200, 86_400, 8, 1.0))
    cfg = replace(CFG, mode=Mode.PERIODIC, schedule=windows)
    at = lambda t: ServiceObservation(decode_tps=Signal(600.0, t))  # noqa: E731
    dec, st = decide_service(cfg, state(2, 6), at(50_000.0), 50_000.0)  # second window: 4P + 4D
    assert dec.withdraw_prefill >= 0 and dec.withdraw_decode >= 0
    assert (dec.action, dec.target_prefill, dec.target_decode) == (Action.SCALE_IN, 4, 6)
    assert (dec.withdraw_prefill, dec.withdraw_decode) == (0, 2)
    later = 50_000.0 + cfg.soft_scale_in_window_s + 1
    done, _ = decide_service(cfg, st, at(later), later)
    assert (done.action, done.target_prefill, done.target_decode) == (Action.TERMINATE_WITHDRAWN, 4, 4)


def test_a_budget_cut_keeps_a_soft_scale_in_in_progress():
    cfg = replace(CFG, gpus_per_prefill=1, gpus_per_decode=1)
    fleet = FleetConfig(services={"a": cfg}, gpu_budget=6)
    st0 = PolicyState(services={"a": state(2, 6, soft=SOFT)})  # withdrawing towards 1P/3D
    decision, st = decide(st0, Observation(services={"a": obs(300)}), NOW, fleet)
    dec = decision.services["a"]
    assert dec.reason is Reason.BUDGET_LIMITED and dec.target_prefill + dec.target_decode <= 6
    assert st.services["a"].soft is not None  # the soft scale-in goes on
    assert (dec.withdraw_prefill, dec.withdraw_decode) == (dec.target_prefill - 1, dec.target_decode - 3)


def test_a_size_that_rounds_to_the_current_one_is_not_reported_at_bound():
    dec, _ = decide_service(CFG, state(2, 6), obs(520), NOW)  # 5.2 instances: outside the band, rounds to 6
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.WITHIN_BAND)
    assert "round to the current" in dec.diagnostics.note


def test_a_latency_step_at_the_bound_changes_nothing_and_keeps_the_cooldown():
    st0 = state(10, 30, out=NOW - 1000)
    dec, st = decide_service(CFG, st0, obs(300, tbt=0.08), NOW)  # wants to scale in, latency says no, at max
    assert (dec.action, dec.reason, dec.target_prefill, dec.target_decode) == (Action.HOLD, Reason.AT_BOUND, 10, 30)
    assert st.last_scale_out_s == NOW - 1000 and st.last_latency_step_s is None


def test_sizing_from_demand_rounds_once():
    cfg = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=8.9, max_prefill=100, max_decode=100)
    assert cfg.pair_for_demand(0.22) == (2, 1)  # not ceil(ceil(0.22) x 8.9) = 9
    dec, _ = decide_service(cfg, state(9, 1), obs(22.0), NOW)
    assert (dec.action, dec.target_prefill, dec.target_decode) == (Action.SCALE_IN, 9, 1)
    assert (dec.withdraw_prefill, dec.withdraw_decode) == (7, 0)
    zero, _ = decide_service(cfg, state(9, 1), obs(0.0), NOW)
    assert (zero.reason, zero.withdraw_prefill) == (Reason.ZERO_TRAFFIC, 8)  # zero traffic: P to its minimum


@given(st.floats(0, 500, allow_nan=False), st.floats(0.05, 12), st.integers(1, 4), st.integers(1, 3))
@settings(max_examples=300, deadline=None)
def test_the_ratio_band_holds_for_any_demand(x, ratio, min_d, min_p):
    cfg = PolicyConfig(target_decode_tps_per_instance=1.0, prefill_per_decode=ratio, min_decode=min_d,
                       min_prefill=min_p, max_decode=200, max_prefill=max(min_p, math.ceil(200 * ratio)))
    p, d = cfg.pair_for_demand(x)
    assert cfg.min_decode <= d <= cfg.max_decode and cfg.min_prefill <= p <= cfg.max_prefill
    assert cfg.ratio_holds(p, d)
    assert d == max(min_d, min(200, math.ceil(x - 1e-9)))


def test_the_latency_safety_net_waits_while_added_instances_are_still_starting():
    starting = replace(obs(600, tbt=0.08), decode=RoleCounts(ready=6, pending=2))
    dec, _ = decide_service(CFG, state(), starting, NOW)
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.WITHIN_BAND)
    started = replace(obs(600, tbt=0.08), decode=RoleCounts(ready=8))
    assert decide_service(CFG, state(), started, NOW)[0].reason is Reason.LATENCY_SEVERE
