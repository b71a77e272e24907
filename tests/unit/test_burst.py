"""The burst path (`autoscaler.policy`, "Burst path"): queued requests act at once; withdrawn replicas are the
first capacity back; no scale-in while requests queue; off unless configured."""

from dataclasses import replace

from autoscaler.model import (Action, PolicyConfig, Reason, RoleCounts, ServiceObservation, ServiceState, Signal,
                              SoftScaleIn)
from autoscaler.policy import decide_service
from autoscaler.signals import IngressReport, ReplicaReport, SignalStore
from common.vocab import Role

NOW = 10_000.0
CFG = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=0.5, max_prefill=50, max_decode=50,
                   scale_out_cooldown_s=180.0, scale_in_cooldown_s=600.0, latency_cooldown_s=60.0,
                   soft_scale_in_window_s=300.0, staleness_limit_s=60.0, burst_queue_per_decode=2.0)


def obs(tps, queued=None, ready=6, pending=0):
    return ServiceObservation(decode_tps=Signal(tps, NOW), queued=Signal(queued, NOW) if queued is not None
                              else Signal(), decode=RoleCounts(ready=ready, pending=pending), prefill=RoleCounts(3))


def test_a_queue_restores_a_soft_scale_in_at_once():
    soft = SoftScaleIn(NOW - 30, 3, 6, 2, 3)
    dec, st = decide_service(CFG, ServiceState(3, 6, soft=soft), obs(300.0, queued=30), NOW)
    assert (dec.action, dec.reason, dec.target_decode, dec.withdraw_decode) == (Action.RESTORE, Reason.BURST, 6, 0)
    assert st.soft is None


def test_a_queue_steps_out_inside_the_band_and_the_cooldown_of_the_rate_rule():
    st = ServiceState(3, 6, last_scale_out_s=NOW - 10)  # the proportional rule is in its scale-out cooldown
    dec, _ = decide_service(CFG, st, obs(600.0, queued=30), NOW)  # 600 tokens/s: inside the band of 6
    assert (dec.action, dec.reason, dec.target_decode, dec.target_prefill) == (Action.SCALE_OUT, Reason.BURST, 8, 4)


def test_below_the_threshold_or_off_or_while_replicas_start_nothing_extra():
    st = ServiceState(3, 6)
    assert decide_service(CFG, st, obs(600.0, queued=12), NOW)[0].reason is Reason.WITHIN_BAND  # 2 per replica
    off = replace(CFG, burst_queue_per_decode=None)
    assert decide_service(off, st, obs(600.0, queued=300), NOW)[0].reason is Reason.WITHIN_BAND
    assert decide_service(CFG, st, obs(600.0, queued=300, pending=2), NOW)[0].reason is Reason.WITHIN_BAND


def test_no_scale_in_while_requests_queue():
    st = ServiceState(3, 6, last_latency_step_s=NOW - 10)  # no step now (its cooldown), and the rate says 2
    dec, _ = decide_service(CFG, st, obs(200.0, queued=30), NOW)
    assert (dec.action, dec.reason, dec.target_decode) == (Action.HOLD, Reason.BURST, 6)


def test_the_push_signals_count_waiting_requests_and_shed_ones():
    store = SignalStore(keep_s=60)
    for t, waiting in ((0.0, 1), (5.0, 4)):
        store.add_replica(ReplicaReport("d1", "dg", Role.DECODE, NOW + t, int(100 * t), 0, num_waiting=waiting))
        store.add_replica(ReplicaReport("p1", "dg", Role.PREFILL, NOW + t, 0, int(1000 * t), num_waiting=2))
    store.add_ingress(IngressReport("i", NOW, {}, admitted=0, shed=0))
    store.add_ingress(IngressReport("i", NOW + 5, {}, admitted=40, shed=3))
    sig = store.signals({Role.DECODE: ["d1"], Role.PREFILL: ["p1"]}, NOW + 5, 20, 10, 0.9)
    assert sig.queued.value == 4 + 2 + 3
