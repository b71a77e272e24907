"""The start-up-aware forecast (`autoscaler.forecast`, `autoscaler.policy`): a seasonal profile learned from
earlier periods, looked up one measured start-up ahead; it raises capacity before a ramp that repeats, never
cuts, tracks its own error, and is silent on cold history."""

import math
from dataclasses import replace

import pytest

from autoscaler import persistence
from autoscaler.forecast import ERROR_CAP, Profile
from autoscaler.model import Action, PolicyConfig, PolicyState, Reason, ServiceObservation, ServiceState, Signal
from autoscaler.policy import decide_service

PERIOD = 3_600.0
CFG = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=1.0, max_prefill=100, max_decode=100,
                   scale_out_cooldown_s=60.0, scale_in_cooldown_s=300.0, soft_scale_in_window_s=120.0,
                   staleness_limit_s=60.0, forecast_period_s=PERIOD, forecast_bin_s=60.0)


def demand(t):
    """A ramp at minute 30 of every hour: 200 tokens/s, then 1,000."""
    return 1_000.0 if (t % PERIOD) >= 1_800 else 200.0


def run(cfg, periods, startup_s=180.0, tick_s=30.0, start_state=None):
    """The policy alone, every tick observing `demand` (served as asked); returns (t, decision) of the last period."""
    st, out = start_state, []
    t = 0.0
    while t < periods * PERIOD:
        obs = ServiceObservation(decode_tps=Signal(demand(t), t), startup_s=Signal(startup_s, t))
        dec, st = decide_service(cfg, st, obs, t)
        if t >= (periods - 1) * PERIOD:
            out.append((t, dec))
        t += tick_s
    return out, st


def first_scale_out(decisions, after_s):
    return next(t for t, d in decisions if d.action is Action.SCALE_OUT and t % PERIOD >= after_s)


def test_a_ramp_seen_in_an_earlier_period_is_met_one_startup_ahead():
    reactive, _ = run(replace(CFG, forecast_period_s=None), periods=2)
    ahead, st = run(CFG, periods=2)
    t_reactive = first_scale_out(reactive, 1_000)
    t_ahead = first_scale_out(ahead, 1_000)
    assert t_reactive % PERIOD >= 1_800  # reactive: when the ramp is there
    assert 1_800 - 180 - 60 <= t_ahead % PERIOD < 1_800  # one start-up (plus a bin) ahead of it
    dec = next(d for t, d in ahead if t == t_ahead)
    assert dec.reason is Reason.FORECAST and dec.target_decode >= 10
    assert dec.diagnostics.forecast_decode_tps >= 1_000


def test_cold_history_is_reactive():
    ahead, _ = run(CFG, periods=1)
    reactive, _ = run(replace(CFG, forecast_period_s=None), periods=1)
    assert [(t, d.action, d.target_decode) for t, d in ahead] == [(t, d.action, d.target_decode) for t, d in reactive]
    assert all(d.reason is not Reason.FORECAST for _, d in ahead)


def test_no_measured_startup_no_forecast():
    ahead, _ = run(CFG, periods=2, startup_s=None)
    assert all(d.reason is not Reason.FORECAST for _, d in ahead)


def test_a_forecast_never_cuts_alone():
    # a profile that expects a trough an instant later: the decision is the reactive one
    profile = Profile.empty(PERIOD, 60.0, 0.0)
    profile = replace(profile, prev=tuple(10.0 if i == 5 else 1_000.0 for i in range(60)), period_index=1)
    st = ServiceState(10, 10, profile=profile)
    obs = ServiceObservation(decode_tps=Signal(1_000.0, PERIOD + 120), startup_s=Signal(180.0, PERIOD + 120))
    dec, _ = decide_service(CFG, st, obs, PERIOD + 120)
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.WITHIN_BAND)


def test_the_forecast_error_is_tracked_and_widens_the_forecast():
    p = Profile.empty(PERIOD, 60.0, 0.0)
    p = replace(p, prev=(100.0,) * 60, period_index=0)
    p = p.remember(100.0, 100.0)
    p = p.observe(120.0, 200.0)  # what came was twice the forecast: relative error 0.5
    assert p.error == pytest.approx(0.1 * 0.5) and p.errors_seen == 1 and p.pending == ()
    assert p.widened(100.0) == pytest.approx(105.0)
    for i in range(200):
        p = p.remember(200.0 + i, 10.0).observe(200.0 + i, 1_000.0)
    assert p.error == pytest.approx(ERROR_CAP)


def test_a_new_period_folds_this_ones_bins_into_history():
    p = Profile.empty(PERIOD, 60.0, 0.0)
    for t in range(0, 3_600, 30):
        p = p.observe(float(t), 100.0 + t / 36)
    assert all(v is None for v in p.prev)
    p = p.observe(PERIOD, 500.0)
    assert p.prev[0] == pytest.approx(100.0 + 15 / 36, rel=1e-6) and p.prev[59] > p.prev[0]
    assert p.cur[0] == 500.0 and p.cur[1] is None
    # today's level scales the profile, clipped to x2
    assert p.level(PERIOD, 60.0) == 2.0  # 500 against ~100
    assert p.expected(PERIOD, PERIOD + 60.0, 1.5) == pytest.approx(1.5 * p.prev[1])


def test_todays_level_sums_the_last_horizons_bins_so_a_near_empty_bin_cannot_swing_it():
    """The demo's first run: the bin before the load began held ~0 tokens/s, the single-bin level hit its clip
    (x2) on a ramp's first tick and forecast twice the history's peak. Over the last horizon's bins the level is
    what today ran against what the same bins ran before."""
    prev = (0.5,) + (100.0,) * 59
    p = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=prev)
    for t in range(0, 300, 30):
        p = p.observe(float(t), 120.0 if t < 60 else 100.0)  # this period: bin 0 busier than its near-zero past
    assert p.level(270.0, 0.0) == pytest.approx(1.0)  # the current bin alone
    assert p.level(270.0, 240.0) == pytest.approx((120 + 4 * 100) / (0.5 + 4 * 100))
    assert p.level(30.0, 240.0) == 2.0  # only the near-empty bin: clipped, as before
    assert Profile.empty(PERIOD, 60.0, 0.0).level(30.0, 240.0) is None  # cold


DAY, BIN = 86_400.0, 300.0


def test_a_spike_is_not_learned_as_a_season():
    """Bursty's scoring day: a random 10-minute 2x spike of the day before came back as a 1.5x phantom the
    forecast held capacity for. Folded through the opening (30 minutes of a day), a rise narrower than that
    takes its surroundings' value; a plateau wider than it and its ramps stay as they were."""
    p = Profile.empty(DAY, BIN, 0.0)
    assert p.event_bins == 6
    ran = [100.0] * 288
    ran[100:102] = [200.0, 200.0]  # a 10-minute spike
    ran[200:224] = [300.0] * 24  # a 2-hour plateau
    ran[199], ran[224] = 200.0, 200.0  # its ramps
    p = replace(p, cur=tuple(ran), cur_n=(1,) * 288)
    folded = p.next_period(1)
    assert folded.prev[100:102] == (100.0, 100.0)
    assert folded.prev[199:225] == tuple(ran[199:225])
    assert folded.prev[:100] == tuple(ran[:100])
    # a forecast into the next period folds this one's bins the same way
    late = DAY - 60.0
    assert p._history(late, DAY + 100 * BIN) == 100.0 and p._history(late, DAY + 210 * BIN) == 300.0


def test_a_period_of_minutes_filters_nothing():
    """The demo's period (minutes, 10-second bins): the opening is under 2 bins wide and folds bins as before."""
    p = Profile.empty(240.0, 10.0, 0.0)
    assert p.event_bins == 0
    ran = tuple(500.0 if i == 7 else 100.0 for i in range(24))
    assert replace(p, cur=ran, cur_n=(1,) * 24).next_period(1).prev == ran


def test_todays_level_is_capped_by_the_last_hours():
    """A spike lifts the level over the last start-up (x2 here) but hardly over the last hour, and the forecast
    must not multiply the whole profile by it; a lasting rise lifts both."""
    p = replace(Profile.empty(DAY, BIN, 0.0), prev=(100.0,) * 288)
    spike = replace(p, cur=(100.0,) * 10 + (200.0, 200.0) + (None,) * 276)
    now = 11 * BIN + 60.0
    assert spike.level(now, 180.0) == pytest.approx(2.0)
    assert spike.todays_level(now, 180.0) == pytest.approx((10 * 100 + 2 * 200) / (12 * 100))
    lasting = replace(p, cur=(150.0,) * 12 + (None,) * 276)
    assert lasting.todays_level(now, 180.0) == pytest.approx(1.5)
    fall = replace(p, cur=(100.0,) * 10 + (50.0, 50.0) + (None,) * 276)
    assert fall.todays_level(now, 180.0) == pytest.approx(0.5)
    assert Profile.empty(DAY, BIN, 0.0).todays_level(now, 180.0) is None

def observed_flat(p: Profile, until_s: float, value: float = 100.0) -> Profile:
    for t in range(0, int(until_s) + 1, 30):
        p = p.observe(float(t), value)
    return p


def test_the_forecast_is_the_peak_up_to_one_startup_and_one_bin_ahead():
    """A replica started now serves from one start-up on, and capacity cut now takes as long to come back: the
    forecast is the highest expected demand of every bin up to the horizon plus the profile's resolution."""
    p = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=(100.0,) * 10 + (900.0,) + (100.0,) * 49)
    p = observed_flat(p, 10 * 60.0 - 30)  # today ran as the history did: level 1
    # the peak (bin 10, from 600 s) two bins past now + 120 s: not yet; one bin past: forecast
    assert p.forecast(6 * 60.0, 120.0) == pytest.approx(100.0)
    assert p.forecast(7 * 60.0, 120.0) == pytest.approx(900.0)
    # inside the window, before its end: still held (a cut now could not come back in time)
    assert p.forecast(10 * 60.0 - 30, 120.0) == pytest.approx(900.0)
    assert p.expected(7 * 60.0, 7 * 60.0 + 120.0, 1.0) == pytest.approx(100.0)  # the scored point


def test_a_forecast_into_the_next_period_uses_this_periods_bins():
    """Near the period's end the window reaches the next period's first bins: what this period saw in them
    counts as `next_period` will fold it, not only the older periods' mean."""
    p = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=(100.0,) * 60)
    p = observed_flat(p, PERIOD - 90.0)
    p = replace(p, cur=(1_000.0,) + p.cur[1:])  # bin 0 of this period ran at 1,000
    late = PERIOD - 90.0
    assert p.forecast(late, 120.0) == pytest.approx(0.5 * 100.0 + 0.5 * 1_000.0)
    assert p.forecast(late - 300.0, 120.0) == pytest.approx(100.0)  # window inside this period


def test_the_profile_survives_the_saved_state():
    _, st = run(CFG, periods=1)
    raw = persistence.encode(PolicyState(services={"svc": st}), {}, 3)
    policy, _, _ = persistence.decode(raw, object)
    assert policy.services["svc"] == st
    assert not math.isnan(st.profile.error)


def test_the_live_world_measures_a_new_replicas_startup_for_the_horizon():
    """RayWorld: a replica that turns Ready measures now minus when it appeared; replicas Ready when the
    controller started measure nothing. The observation (and the decision log) carry the slower role's."""
    from tests.fakes import DG_A, FakeServe, Harness

    class SlowStart(FakeServe):
        def __init__(self, clock, startup_s):
            super().__init__()
            self.clock, self.startup_s, self.born = clock, startup_s, {}

        def _ids(self, n):
            ids = super()._ids(n)
            self.born.update({i: self.clock.t for i in ids})
            return ids

        def details(self):
            d = super().details()
            for app in d["applications"].values():
                for dep in app["deployments"].values():
                    for r in dep["replicas"]:
                        young = self.clock.t - self.born.get(r["replica_id"], -1e9) < self.startup_s
                        r["state"] = "STARTING" if young else "RUNNING"
            return d

    from tests.fakes import Clock

    serve = SlowStart(Clock(), 40.0)
    serve.deploy_group(None, DG_A, 0, "/m")
    serve.born.clear()  # the deployed group was Ready before the controller started
    h = Harness(serve=serve)
    serve.clock = h.clock
    entries = h.run(10, decode_tps_each=180)
    assert h.ctl.world.measured_startup() is None and entries[0]["observation"]["startup_s"] is None
    assert any(e["action"] == "scale_out" for e in entries)  # after half a signal window of reports
    entries = h.run(60, decode_tps_each=180)
    assert 35.0 <= h.ctl.world.measured_startup() <= 45.0  # seen a control period (5 s) apart at both ends
    assert entries[-1]["observation"]["startup_s"] == h.ctl.world.measured_startup()


def test_a_soft_scale_in_is_restored_when_the_forecast_says_its_load_returns():
    from autoscaler.model import SoftScaleIn

    profile = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=tuple(200.0 if i < 30 else 1_000.0 for i in range(60)),
                      period_index=1)
    soft = SoftScaleIn(PERIOD + 1_500, 10, 10, 2, 2)
    st = ServiceState(10, 10, profile=profile, soft=soft)
    t = PERIOD + 1_700  # 100 s before the ramp, start-up 180 s
    obs = ServiceObservation(decode_tps=Signal(200.0, t), startup_s=Signal(180.0, t))
    dec, _ = decide_service(CFG, st, obs, t)
    # its reason is the forecast (the demo counts these as prewarms), not a breach or the load: neither happened
    assert (dec.action, dec.reason) == (Action.RESTORE, Reason.FORECAST)
    dec, _ = decide_service(replace(CFG, forecast_period_s=None), replace(st, profile=None), obs, t)
    assert dec.action is Action.TERMINATE_WITHDRAWN  # reactive: cut 100 s before the ramp


def test_a_hold_the_forecast_asked_for_says_so():
    """The demo's second run: between the ramps the forecast held the first ramp's capacity, and the log said
    `within_band`; a hold the forecast asked for (the load alone asks fewer replicas) is reason `forecast`."""
    profile = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=tuple(200.0 if i < 30 else 1_000.0 for i in range(60)),
                      period_index=1)
    t = PERIOD + 1_700  # 100 s before the ramp, start-up 180 s
    obs = ServiceObservation(decode_tps=Signal(200.0, t), startup_s=Signal(180.0, t))
    dec, _ = decide_service(CFG, ServiceState(10, 10, profile=profile), obs, t)
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.FORECAST)
    dec, _ = decide_service(replace(CFG, forecast_period_s=None), ServiceState(10, 10), obs, t)
    assert dec.action is Action.SCALE_IN  # the load alone: 2 of 10


def test_the_forecast_floors_prefill_even_where_it_asks_no_more_decode_replicas():
    """The demo's third run: after a ramp, 1.08 decode replicas' worth of load (2 replicas) and a forecast of
    1.69 (also 2): without the floor prefill sized from 1.08 x 0.92 (1), cancelled the new group's starting
    prefill, and the forecast asked for it again one tick later."""
    cfg = replace(CFG, prefill_per_decode=0.92)
    profile = replace(Profile.empty(PERIOD, 60.0, 0.0), prev=tuple(108.0 if i < 30 else 169.0 for i in range(60)),
                      period_index=1)
    t = PERIOD + 1_700
    obs = ServiceObservation(decode_tps=Signal(108.0, t), startup_s=Signal(180.0, t))
    dec, _ = decide_service(cfg, ServiceState(2, 2, profile=profile), obs, t)
    assert (dec.action, dec.target_prefill, dec.target_decode) == (Action.HOLD, 2, 2)
    reactive, _ = decide_service(replace(cfg, forecast_period_s=None), ServiceState(2, 2), obs, t)
    assert (reactive.action, reactive.withdraw_prefill, reactive.withdraw_decode) == (Action.SCALE_IN, 1, 0)
