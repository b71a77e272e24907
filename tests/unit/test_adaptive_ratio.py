"""The adaptive P:D ratio (`autoscaler.policy`, "Adaptive ratio"): prefill follows its own demand, bounded,
smoothed and with hysteresis; both pools still move in one decision; a falling ratio goes through withdraw; the
cycle keeps every group inside the band of the ratio it runs at."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.cycle import ClusterView, CycleConfig, GroupState, cycle
from autoscaler.model import (Action, FleetConfig, Mode, Observation, PolicyConfig, PolicyState, Reason, RoleCounts,
                              ScheduleWindow, ServiceObservation, ServiceState, Signal)
from autoscaler.policy import decide_service
from autoscaler.ratio import current_ratio
from common.vocab import DeploymentGroup, NodeInfo, Scope
from placement.scheduler import ServiceShape, in_band, nearest_ratio_in_band

NOW = 10_000.0
# decode target 100 tokens/s, prefill target 1000 KV-miss tokens/s: ratio 1 means 10 prompt tokens per output
CFG = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=1.0, max_prefill=100, max_decode=100,
                   target_prefill_tps_per_instance=1000.0, ratio_window_s=600.0, ratio_hysteresis=0.15,
                   scale_out_cooldown_s=60.0, scale_in_cooldown_s=300.0, soft_scale_in_window_s=120.0,
                   staleness_limit_s=60.0, latency_cooldown_s=60.0)


def obs(decode_tps, prefill_tps, t=NOW):
    return ServiceObservation(decode_tps=Signal(decode_tps, t), prefill_kv_miss_tps=Signal(prefill_tps, t))


def test_a_prompt_heavy_phase_grows_prefill_and_not_decode():
    # 6 decode instances' worth of decode, prefill demand for 12: the ratio doubles, decode holds
    dec, s = decide_service(CFG, ServiceState(6, 6), obs(600.0, 12_000.0), NOW)
    assert (dec.action, dec.reason) == (Action.SCALE_OUT, Reason.RATIO)
    assert (dec.target_prefill, dec.target_decode) == (12, 6)
    assert current_ratio(CFG, s) == pytest.approx(2.0)
    assert CFG.ratio_holds(12, 6, current_ratio(CFG, s))
    assert dec.diagnostics.prefill_per_decode == pytest.approx(2.0)


def test_a_prompt_heavy_phase_on_one_decode_replica_is_a_ratio_decision():
    # 0.6 of one decode replica (outside the band around 1, but one is the minimum) and prefill for 1.8: the
    # live e2e case; the decision is the ratio's, not a proportional one
    one = replace(CFG, min_decode=1, min_prefill=1)
    dec, _ = decide_service(one, ServiceState(1, 1), obs(60.0, 1_800.0), NOW)
    assert (dec.action, dec.reason, dec.target_prefill, dec.target_decode) == (Action.SCALE_OUT, Reason.RATIO, 2, 1)


def test_the_fixed_ratio_is_the_paper_policy_without_a_prefill_target():
    fixed = replace(CFG, target_prefill_tps_per_instance=None)
    dec, s = decide_service(fixed, ServiceState(6, 6), obs(600.0, 12_000.0), NOW)
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.WITHIN_BAND)
    assert s.prefill_per_decode is None and s.ratio_estimate is None


def test_inside_the_hysteresis_nothing_moves():
    dec, s = decide_service(CFG, ServiceState(6, 6), obs(600.0, 6_800.0), NOW)  # asks 1.13: inside +/- 15 %
    assert (dec.action, dec.reason) == (Action.HOLD, Reason.WITHIN_BAND)
    assert s.ratio_estimate == pytest.approx(6_800 / 6_000)


def test_the_ratio_is_bounded():
    dec, s = decide_service(CFG, ServiceState(6, 6), obs(600.0, 600_000.0), NOW)  # asks 100: bound is 4
    assert s.ratio_estimate == pytest.approx(4.0)
    assert dec.target_prefill == 24


def test_a_falling_ratio_withdraws_prefill_and_is_in_force_only_once_terminated():
    s = ServiceState(12, 6, prefill_per_decode=2.0, ratio_estimate=2.0, ratio_sampled_s=NOW - 60)
    # the estimate falls with a 600 s time constant: an hour of a 1.0 workload brings it down
    t = NOW
    for _ in range(60):
        t += 60
        dec, s = decide_service(CFG, s, obs(600.0, 6_000.0, t), t)
        if dec.action is not Action.HOLD:
            break
    assert (dec.action, dec.reason) == (Action.SCALE_IN, Reason.RATIO)
    assert dec.withdraw_prefill > 0 and dec.withdraw_decode == 0
    assert current_ratio(CFG, s) == 2.0  # the old band holds the groups while the withdrawn prefill drains
    new_ratio = s.soft.to_ratio
    assert new_ratio < 2.0 / 1.15
    dec, s = decide_service(CFG, s, obs(600.0, 6_000.0, t + 121), t + 121)
    assert dec.action is Action.TERMINATE_WITHDRAWN
    assert current_ratio(CFG, s) == new_ratio
    assert CFG.ratio_holds(dec.target_prefill, dec.target_decode, new_ratio)


def test_a_rising_estimate_is_taken_at_once_a_falling_one_slowly():
    s = ServiceState(6, 6, prefill_per_decode=1.0, ratio_estimate=1.0, ratio_sampled_s=NOW - 60)
    _, up = decide_service(replace(CFG, scale_out_cooldown_s=1e9), s, obs(600.0, 9_000.0), NOW)
    assert up.ratio_estimate == pytest.approx(1.5)
    _, down = decide_service(CFG, replace(s, ratio_estimate=1.5), obs(600.0, 6_000.0), NOW)
    assert 1.5 - 0.5 * 0.11 < down.ratio_estimate < 1.5 - 0.5 * 0.09  # 60 s of a 600 s time constant: ~10 %


def test_missing_prefill_signal_leaves_the_estimate():
    s = ServiceState(6, 6, prefill_per_decode=1.5, ratio_estimate=1.5, ratio_sampled_s=NOW - 60)
    dec, new = decide_service(CFG, s, ServiceObservation(decode_tps=Signal(600.0, NOW)), NOW)
    assert (new.ratio_estimate, new.prefill_per_decode) == (1.5, 1.5)
    assert dec.action is Action.HOLD


def test_decode_and_prefill_grow_in_one_decision_and_a_scale_out_never_cuts_prefill():
    s = ServiceState(12, 6, prefill_per_decode=2.0, ratio_estimate=2.0, ratio_sampled_s=NOW - 60)
    # decode demand 9, prefill demand as before (ratio would fall to ~1.3): decode grows, prefill stays
    dec, new = decide_service(CFG, s, obs(900.0, 12_000.0), NOW)
    assert dec.action is Action.SCALE_OUT
    assert dec.target_decode == 9 and dec.target_prefill >= 12
    assert CFG.ratio_holds(dec.target_prefill, dec.target_decode, current_ratio(CFG, new))


def test_the_adaptive_ratio_needs_the_metrics_mode():
    with pytest.raises(ValueError, match="target_prefill_tps_per_instance .* needs mode 'metrics'"):
        replace(CFG, mode=Mode.PERIODIC, schedule=(ScheduleWindow(0, 86_400, 4, 1.0),))
    with pytest.raises(ValueError, match=r"ratio_range \(0.5\)"):
        replace(CFG, ratio_range=0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=5),
       st.floats(0.05, 20.0))
def test_the_nearest_ratio_in_band_holds_every_group(groups, ratio):
    r = nearest_ratio_in_band(groups, ratio)
    if r is not None:
        assert all(in_band(p, d, r) for p, d in groups)
    if all(in_band(p, d, ratio) for p, d in groups):
        assert r == ratio


def _view(groups):
    nodes = tuple(NodeInfo(f"n{i}", "H100", 64, 64, f"s1-{i}", "s2-0") for i in range(6))
    used = {}
    for g in groups:
        used[g.group.domain] = used.get(g.group.domain, 0) + g.group.num_prefill + g.group.num_decode
    nodes = tuple(replace(n, free_gpus=max(0, n.total_gpus - used.get(n.s1, 0))) for n in nodes)
    return ClusterView(nodes=nodes, groups={"svc": tuple(groups)})


def _group(name, domain, p, d, wp=0, wd=0):
    return GroupState(DeploymentGroup(name, "svc", Scope.S1, domain, "H100", "H100", p, d),
                      RoleCounts(ready=p - wp, withdrawn=wp), RoleCounts(ready=d - wd, withdrawn=wd))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.floats(100.0, 1500.0), st.floats(0.3, 3.0)), min_size=3, max_size=16),
       st.sampled_from([0.0, 90.0]))
def test_through_a_drifting_mix_every_group_stays_in_the_band_of_the_ratio_in_force(steps, soft_s):
    """Random decode demand and prompt:output mixes through the whole cycle (decide + place), the world
    applying every action at once: after each cycle each group holds both roles inside the band of the ratio
    the policy's state has in force."""
    cfg = replace(CFG, scale_out_cooldown_s=0.0, scale_in_cooldown_s=0.0, soft_scale_in_window_s=soft_s)
    shape = ServiceShape("svc", ("H100",), ("H100",))
    config = CycleConfig(fleet=FleetConfig(services={"svc": cfg}), shapes={"svc": shape})
    groups = [_group("svc-s1-0", "s1-0", 4, 4), _group("svc-s1-1", "s1-1", 3, 3), _group("svc-s1-2", "s1-2", 2, 2)]
    state = PolicyState(services={"svc": ServiceState(9, 9)})
    t = NOW
    for decode_tps, mix in steps:
        t += 60
        observation = Observation(services={"svc": replace(
            obs(decode_tps, decode_tps * 10 * mix, t),
            prefill=RoleCounts.total(g.prefill for g in groups), decode=RoleCounts.total(g.decode for g in groups))})
        result, state = cycle(state, observation, _view(groups), t, config)
        by_name = {g.group.name: g for g in groups}
        for a in result.actions:
            if a.group.num_prefill == 0 and a.group.num_decode == 0:
                by_name.pop(a.group.name, None)
            else:
                by_name[a.group.name] = _group(a.group.name, a.group.domain, a.group.num_prefill, a.group.num_decode,
                                               a.withdrawn_prefill, a.withdrawn_decode)
        groups = list(by_name.values())
        ratio = current_ratio(cfg, state.services["svc"])
        counts = [(g.group.num_prefill, g.group.num_decode) for g in groups]
        assert all(in_band(p, d, ratio) for p, d in counts), (ratio, counts)
