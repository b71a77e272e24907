import math

import pytest

from serving.engine_stats import EngineStats


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rates_over_the_window_and_totals():
    clock = FakeClock()
    stats = EngineStats(clock=clock)
    for _ in range(10):  # 10 s at 100 generated tokens/s, 50 computed + 200 transferred prompt tokens/s
        clock.t += 1.0
        stats.record_iteration(generation_tokens=100, prompt_total=250, prompt_computed=50, prompt_local_hit=0,
                               prompt_external=200, ttfts_s=[0.1], tbts_s=[0.01, 0.03], finished=1)
    snap = stats.snapshot(window_s=5.0)
    assert snap.decode_tokens_per_s == pytest.approx(100.0)
    assert snap.prefill_computed_tokens_per_s == pytest.approx(50.0)
    assert snap.prompt_external_tokens_per_s == pytest.approx(200.0)
    assert snap.total_generation_tokens == 1000 and snap.total_prompt_external_tokens == 2000
    assert snap.total_finished_requests == 10
    assert snap.tbt_p50_s == pytest.approx(0.02)


def test_idle_engine_reports_zero_rate_and_nan_latency():
    clock = FakeClock()
    stats = EngineStats(clock=clock)
    clock.t += 60
    snap = stats.snapshot(30.0)
    assert snap.decode_tokens_per_s == 0.0
    assert math.isnan(snap.ttft_p50_s)
    assert "ttft_p50_s" not in snap.as_metrics()  # missing stays missing, never 0 ("perfect latency")
    assert snap.as_metrics()["decode_tokens_per_s"] == 0.0
    with pytest.raises(ValueError, match=r"window_s \(0\)"):
        stats.snapshot(0)


def test_old_samples_leave_the_window():
    clock = FakeClock()
    stats = EngineStats(clock=clock)
    stats.record_iteration(generation_tokens=1000, prompt_total=0, prompt_computed=0, prompt_local_hit=0,
                           prompt_external=0, ttfts_s=[5.0], tbts_s=[], finished=0)
    clock.t += 100
    stats.record_iteration(generation_tokens=10, prompt_total=0, prompt_computed=0, prompt_local_hit=0,
                           prompt_external=0, ttfts_s=[0.2], tbts_s=[], finished=0)
    snap = stats.snapshot(10.0)
    assert snap.ttft_p90_s == pytest.approx(0.2)
    assert snap.decode_tokens_per_s < 10.0


def test_logger_reads_real_vllm_stat_objects():
    """Guards against vLLM renaming the fields we read (the classes are not a stable API)."""
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    from serving import engine_stats

    engine_stats.ENGINE_STATS = fresh = EngineStats()
    try:
        it = IterationStats()
        it.num_generation_tokens = 7
        it.prompt_token_stats.computed = 3
        it.prompt_token_stats.external_kv_transfer = 125
        it.prompt_token_stats.total = 128
        it.time_to_first_tokens_iter.append(0.05)
        sched = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25)
        engine_stats.EngineStatsLogger(None).record(sched, it)
        snap = fresh.snapshot()
        assert (snap.total_generation_tokens, snap.total_prompt_external_tokens) == (7, 125)
        assert (snap.num_running, snap.num_waiting, snap.kv_cache_usage) == (2, 1, 0.25)
    finally:
        engine_stats.ENGINE_STATS = EngineStats()
