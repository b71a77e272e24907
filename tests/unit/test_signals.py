"""Pushed-report signals (autoscaler.signals), mergeable histograms (common.histogram), per-replica membership
(autoscaler.membership) and the `autoscaling` config section (autoscaler.settings)."""

from __future__ import annotations

import math
import random

import pytest
import yaml

from autoscaler.membership import GroupMembers, update_members
from autoscaler.settings import controller_settings, policy_config
from autoscaler.signals import IngressReport, ReplicaReport, SignalStore
from common import histogram
from common.config import ConfigError, parse_service_spec
from common.vocab import Role
from tests.conftest import EXAMPLES

D, P = Role.DECODE, Role.PREFILL


def hist(values):
    counts = histogram.empty()
    histogram.add(counts, values)
    return tuple(counts)


def exact_quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def test_histogram_quantile_is_within_one_bucket_of_the_exact_one():
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 1) for _ in range(5000)]
    for q in (0.5, 0.9, 0.99):
        got = histogram.quantile(hist(values), q)
        assert abs(got / exact_quantile(values, q) - 1) < 0.16, q
    assert histogram.quantile(histogram.empty(), 0.9) is None
    counts = histogram.empty()
    histogram.add(counts, [float("nan"), -1.0, float("inf")])
    assert sum(counts) == 0  # bad samples are not recorded


def test_merged_histograms_give_the_pooled_percentile_not_the_mean_of_percentiles():
    fast, slow = [0.01] * 900, [1.0] * 100  # one replica fast with many samples, one slow with few
    merged = histogram.merge([hist(fast), hist(slow)])
    p50 = histogram.quantile(merged, 0.5)
    assert p50 < 0.012  # the pooled median is fast; the mean of the two medians would be ~0.5 s
    assert histogram.delta(hist([0.1, 0.2]), hist([0.1])) == list(hist([0.2]))
    assert histogram.delta(hist([0.1]), hist([0.1, 0.2])) == list(hist([0.1]))  # a reset: the newer counts
    with pytest.raises(ValueError, match="buckets"):
        histogram.merge([[1, 2]])


def report(rid, role, t, tokens, tbts=(), group="dg-a"):
    return ReplicaReport(rid, group, role, t, generation_tokens=tokens if role is D else 0,
                         prompt_computed_tokens=tokens if role is P else 0, tbt_hist=hist(tbts))


def test_decode_tps_is_the_sum_of_windowed_rates_of_running_replicas():
    store = SignalStore(keep_s=60)
    for t in range(0, 11):
        store.add_replica(report("d1", D, float(t), 100 * t, [0.02] * t))
        store.add_replica(report("d2", D, float(t), 50 * t, [0.05] * t))
        store.add_replica(report("p1", P, float(t), 1000 * t))
    s = store.signals({D: ["d1", "d2"], P: ["p1"]}, now_s=10.0, window_s=5.0, staleness_s=3.0, quantile=0.9)
    assert s.decode_tps.value == pytest.approx(150.0) and s.decode_tps.sampled_at_s == 10.0
    assert s.prefill_kv_miss_tps.value == pytest.approx(1000.0)
    assert 0.04 < s.tbt_s.value < 0.06  # p90 of the merged samples (d2's are a third of them)
    # a replica Serve no longer lists (killed) is not counted, even though its reports are fresh
    assert store.signals({D: ["d1"], P: ["p1"]}, 10.0, 5.0, 3.0, 0.9).decode_tps.value == pytest.approx(100.0)


def test_a_running_replica_without_a_fresh_report_makes_the_signal_missing_never_zero():
    store = SignalStore(keep_s=60)
    for t in range(0, 6):
        store.add_replica(report("d1", D, float(t), 100 * t))
    s = store.signals({D: ["d1", "d-new"], P: []}, 5.0, 5.0, 3.0, 0.9)
    assert s.decode_tps.value is None and "d-new" in s.note
    s = store.signals({D: ["d1"]}, now_s=20.0, window_s=5.0, staleness_s=3.0, quantile=0.9)  # d1 went silent
    assert s.decode_tps.value is None
    assert s.tbt_s.value is None  # no TBT sample in the window: missing, not "perfect latency"
    assert s.prefill_kv_miss_tps.value is None and "no RUNNING prefill" in s.note
    single = SignalStore(keep_s=60)
    single.add_replica(report("d1", D, 1.0, 0))
    assert single.signals({D: ["d1"]}, 1.0, 5.0, 3.0, 0.9).decode_tps.value is None  # one report: no rate yet


def test_a_controller_that_just_began_to_hear_reports_has_no_rate_until_half_a_window():
    """A rate over the first second or two of a new (or restarted) controller's reports is one request's
    burst: live, a light load (0.6 of one decode replica) read as 1.7 on the first tick and scaled out."""
    store = SignalStore(keep_s=60)
    burst = [0, 0, 60]  # one request's tokens land in the second report
    for t, tokens in enumerate(burst):
        store.add_replica(report("d1", D, 100.0 + t, tokens))
        store.add_replica(report("p1", P, 100.0 + t, 10 * tokens))
    s = store.signals({D: ["d1"], P: ["p1"]}, now_s=102.0, window_s=10.0, staleness_s=3.0, quantile=0.9)
    assert s.decode_tps.value is None and s.prefill_kv_miss_tps.value is None
    assert "signal window filling: 2s of reports, rates need 5s" in s.note
    for t in range(3, 6):
        store.add_replica(report("d1", D, 100.0 + t, 60))
        store.add_replica(report("p1", P, 100.0 + t, 600))
    s = store.signals({D: ["d1"], P: ["p1"]}, now_s=105.0, window_s=10.0, staleness_s=3.0, quantile=0.9)
    assert s.decode_tps.value == pytest.approx(60 / 5) and "filling" not in s.note


def test_ttft_comes_from_the_ingress_merged_over_groups():
    store = SignalStore(keep_s=60)
    store.add_ingress(IngressReport("i", 1.0, {"dg-a": hist([0.1] * 10), "dg-b": hist([])}))
    store.add_ingress(IngressReport("i", 6.0, {"dg-a": hist([0.1] * 20), "dg-b": hist([2.0] * 5)}))
    s = store.signals({}, 6.0, 10.0, 3.0, 0.9)
    assert 1.5 < s.ttft_s.value < 2.5  # 10 new at 0.1 s, 5 at 2 s: p90 is in the slow group
    assert s.ttft_s_by_group["dg-a"] == pytest.approx(0.1, rel=0.16)
    assert store.signals({}, 30.0, 10.0, 3.0, 0.9).ttft_s.value is None  # stale ingress


def test_withdrawn_replicas_are_chosen_once_kept_while_alive_and_released_on_restore():
    live = {P: frozenset({"p1"}), D: frozenset({"d1", "d2", "d3"})}
    m = update_members(GroupMembers(), live, {D: 1}, load={"d1": 3, "d2": 0, "d3": 1}, prefill_per_decode=0.5)
    assert m.withdrawn[D] == {"d2"}  # the least loaded
    assert all(m.routable(D, r) for r in ("d1", "d3")) and not m.routable(D, "d2")
    again = update_members(m, live, {D: 1}, load={"d1": 0, "d2": 9, "d3": 0}, prefill_per_decode=0.5)
    assert again.withdrawn[D] == {"d2"}  # level-triggered: the same replica stays withdrawn
    gone = update_members(m, {P: live[P], D: frozenset({"d1", "d3"})}, {D: 1}, {}, 0.5)
    assert len(gone.withdrawn[D]) == 1 and gone.withdrawn[D] <= {"d1", "d3"}
    restored = update_members(m, live, {D: 0}, {}, 0.5)
    assert restored.withdrawn[D] == frozenset() and restored.routable(D, "d2")


def test_ready_ratio_gating_holds_back_the_over_represented_role():
    m = update_members(GroupMembers(), {P: frozenset({"p1"}), D: frozenset({"d1"})}, {}, {}, prefill_per_decode=1.0,
                       tolerance_instances=0, tolerance_fraction=0.0)
    assert m.routable(P, "p1") and m.routable(D, "d1")
    # three more prefill replicas come up before any decode: one may join (1:1 -> 2:1), then prefill is ahead
    prefill = frozenset({"p1", "p2", "p3", "p4"})
    m = update_members(m, {P: prefill, D: frozenset({"d1"})}, {}, {}, 1.0, 0, 0.0)
    assert [m.routable(P, r) for r in ("p1", "p2", "p3", "p4")] == [True, True, False, False]
    m = update_members(m, {P: prefill, D: frozenset({"d1", "d2"})}, {}, {}, 1.0, 0, 0.0)  # decode catches up
    assert m.routable(D, "d2") and m.routable(P, "p3") and not m.routable(P, "p4")


AUTOSCALING = {"target_decode_tps_per_instance": 40, "prefill_per_decode": 1.0, "ttft_slo_s": 2.0,
               "tbt_slo_s": 0.2, "max_prefill": 2, "max_decode": 2}


def service_with(autoscaling):
    data = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())
    data["autoscaling"] = autoscaling
    return parse_service_spec(data, "svc.yaml")


def test_autoscaling_section_converts_to_the_policy_config():
    spec = service_with(AUTOSCALING)
    cfg = policy_config(spec)
    assert cfg.target_decode_tps_per_instance == 40 and cfg.max_decode == 2 and cfg.ttft_slo_s == 2.0
    settings = controller_settings(spec)
    assert settings.control_period_s == 5.0 and settings.graceful_shutdown_timeout_s >= 120


@pytest.mark.parametrize("bad, message", [
    ({"target_decode_tps_per_instance": 0}, r"autoscaling.target_decode_tps_per_instance.*greater than 0"),
    ({"max_decode": 0}, r"autoscaling.max_decode"),
    ({"min_prefill": 3}, r"max_prefill \(2\) must be >= min_prefill \(3\)"),
    ({"mode": "periodic"}, r"mode 'periodic' needs a non-empty schedule"),
    ({"bogus": 1}, r"autoscaling.bogus: Extra inputs are not permitted"),
    ({"graceful_shutdown_timeout_s": 5}, r"graceful_shutdown_timeout_s \(5.0\) must be >= ingress.request_timeout_s"),
    ({"staleness_limit_s": 0.5}, r"staleness_limit_s \(0.5\) must be >= report_interval_s"),
])
def test_a_bad_autoscaling_field_is_an_error_that_names_it(bad, message):
    with pytest.raises(ConfigError, match=message):
        service_with({**AUTOSCALING, **bad})


def test_rules_between_fields_are_checked_by_the_policy_config_and_named():
    spec = service_with({**AUTOSCALING, "prefill_per_decode": 3.0, "min_decode": 1, "max_prefill": 2})
    with pytest.raises(ConfigError, match=r"svc.yaml: autoscaling: max_prefill \(2\) is below the prefill count"):
        policy_config(spec)
