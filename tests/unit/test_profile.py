"""Stress-test analysis (bench.load.profile): per-instance capacities within the SLOs and the derived section."""

import pytest

from bench.load.profile import Step, analyze, constant_trace


def step(rate, decode_tps, prefill_tps, ttft, tbt, failed=0):
    # in flight by Little's law at these p90s (as if every request took them): rate x time in the role
    return Step(rate, 30.0, int(rate * 30), failed, decode_tps, prefill_tps, ttft, tbt, rate * ttft, rate * tbt * 96)


STEPS = [step(1, 96, 200, 0.2, 0.02), step(2, 192, 400, 0.3, 0.03), step(4, 380, 800, 1.5, 0.08),
         step(8, 500, 1100, 6.0, 0.4)]


def test_capacities_come_from_the_highest_step_within_each_slo():
    r = analyze(STEPS, num_prefill=1, num_decode=2, ttft_slo_s=2.0, tbt_slo_s=0.1, mean_input=200, mean_output=96)
    assert r["decode_tps_per_instance_within_tbt_slo"] == 190.0  # 380 tokens/s over 2 decode replicas
    assert r["prefill_tps_per_instance_within_ttft_slo"] == 800.0
    a = r["autoscaling"]
    assert a["target_decode_tps_per_instance"] == 171.0  # 0.9 headroom
    assert a["prefill_per_decode"] == pytest.approx(171.0 / 96 * 200 / 800, abs=1e-3)
    assert a["target_prefill_tps_per_instance"] == 800.0
    # at the profile's own mix the adaptive ratio asks for the profile's ratio
    asked = (200 / a["target_prefill_tps_per_instance"]) / (96 / a["target_decode_tps_per_instance"])
    assert asked == pytest.approx(a["prefill_per_decode"], abs=1e-3)
    assert r["decode_limit_reached"] and r["prefill_limit_reached"]
    # Serve's knob at the same steps: prefill 4 req/s x 1.5 s on one replica, decode 4 x 0.08 x 96 over two
    assert r["serve_target_ongoing_requests"] == {"prefill": pytest.approx(0.9 * 6.0),
                                                  "decode": pytest.approx(0.9 * 4 * 0.08 * 96 / 2, abs=1e-3)}


def test_a_step_with_failures_does_not_count_and_no_limit_means_a_lower_bound():
    steps = STEPS[:2] + [step(4, 380, 800, 0.4, 0.05, failed=3)]
    r = analyze(steps, 1, 1, 2.0, 0.1, 200, 96)
    assert r["decode_tps_per_instance_within_tbt_slo"] == 192.0 and r["decode_limit_reached"]
    r = analyze(STEPS[:2], 1, 1, 2.0, 0.1, 200, 96)
    assert not r["decode_limit_reached"] and not r["prefill_limit_reached"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="even the lowest rate .* misses the TBT SLO"):
        analyze(STEPS, 1, 1, 2.0, 0.001, 200, 96)
    with pytest.raises(ValueError, match=r"num_prefill \(0\)"):
        analyze(STEPS, 0, 1, 2.0, 0.1, 200, 96)
    rows = constant_trace(2.0, 60.0, 100, 10, seed=1)
    assert rows == constant_trace(2.0, 60.0, 100, 10, seed=1) and 80 < len(rows) < 160


def test_in_flight_is_littles_law_over_the_steps_span():
    from bench.load.stats import RequestResult

    def res(sent, ttft, e2e):
        return RequestResult(index=0, scheduled_s=sent, sent_s=sent, status="ok", ttft_s=ttft, e2e_s=e2e,
                             input_tokens=10, output_tokens=5, itls_s=[0.1])

    s = Step.of(1.0, [res(0.0, 1.0, 3.0), res(1.0, 0.5, 3.0), res(2.0, 1.5, 2.0)])  # span 0..4 s
    assert s.duration_s == 4.0
    assert s.prefill_in_flight == pytest.approx(3.0 / 4) and s.decode_in_flight == pytest.approx(5.0 / 4)
