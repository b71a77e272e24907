"""Per-request simulation: sanity at low load, and its agreement with the fluid model below capacity."""

import pytest

from bench.sim.model import Capacity, SimService
from bench.sim.request_sim import compare_with_fluid, simulate_requests
from bench.load.traces import RateShape

SIZES = [(200, 50), (800, 120), (1500, 200), (400, 80)]
SVC = SimService("s", RateShape(mean_rps=10, peak_to_trough=1.0), 725, 112, ttft_slo_s=2.0, tbt_slo_s=0.05)


def test_light_load_latency_is_prefill_plus_transfer_plus_a_step():
    cap = Capacity.of(SVC)
    out = simulate_requests(SVC, cap, 2, 2, rps=0.2, sizes=[(800, 40)], duration_s=300, seed=1)
    assert out["completed"] == out["requests"] > 20
    expected = cap.prefill.prefill_time_s([800])[0] + cap.kv_transfer_s + cap.decode.decode_step_time_s([801])[0]
    assert out["ttft_p50_s"] == pytest.approx(expected, rel=0.05)
    assert out["attainment_ttft"] == 1.0 and out["attainment_tbt"] == 1.0


def test_fluid_model_agrees_below_capacity_and_in_overload():
    rows = compare_with_fluid(SVC, SIZES, loads=(0.5, 0.9), duration_s=300, seed=2)
    assert all(r["abs_error_attainment_ttft"] < 0.02 and r["abs_error_attainment_tbt"] < 0.02 for r in rows)
    # Decode-heavy service near one decode instance's capacity at peak, then 30 % over it: with continuous
    # batching every request slows down, in both models.
    heavy = SimService("h", RateShape(mean_rps=6, peak_to_trough=1.0), 0, 0, ttft_slo_s=2.0, tbt_slo_s=0.05)
    over = compare_with_fluid(heavy, [(200, 600), (400, 800)], loads=(1.3,), duration_s=300, seed=2)[0]
    assert over["per_request"]["attainment_tbt"] < 0.2 and over["fluid"]["attainment_tbt"] == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"P=0"):
        simulate_requests(SVC, Capacity.of(SVC), 0, 1, rps=1.0, sizes=SIZES)


def test_the_fluid_model_sees_a_long_prompt_tail():
    """8 % of prompts are so long that their prefill alone exceeds the TTFT SLO: the per-request run misses
    them at any load; the fluid model over size bins does too, a means-only model cannot."""
    sizes = [(600, 60)] * 92 + [(9000, 60)] * 8
    svc = SimService("tail", RateShape(mean_rps=3, peak_to_trough=1.0), 0, 0, ttft_slo_s=2.0, tbt_slo_s=0.05)
    (row,) = compare_with_fluid(svc, sizes, loads=(0.5,), duration_s=400, seed=3)
    exact = row["per_request"]["attainment_ttft"]
    assert 0.88 < exact < 0.95
    assert row["abs_error_attainment_ttft"] < 0.02
    assert row["fluid_means_only_attainment_ttft"] - exact > 0.04
