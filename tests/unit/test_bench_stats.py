import math

import pytest

from bench.load.plots import read_series, write_plots
from bench.load.stats import RequestResult, summarize
from common.histogram import percentile


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([1, 2, 3, 4], 0.9) == pytest.approx(3.7)
    assert percentile([7], 0.99) == 7
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1], 1.5)


def result(i, ttft, itls, e2e, status="ok", out=4, sent=None):
    return RequestResult(i, scheduled_s=i, sent_s=i if sent is None else sent, input_tokens=10,
                         requested_output_tokens=out, status=status, ttft_s=ttft, itls_s=itls, e2e_s=e2e,
                         output_tokens=out if status == "ok" else 0)


def test_summary_of_known_results():
    results = [result(0, 0.1, [0.01, 0.01, 0.01], 0.13), result(1, 0.2, [0.02, 0.02, 0.30], 0.54),
               result(2, 3.0, [0.01, 0.01, 0.01], 3.03), result(3, None, [], 0.5, status="http_5xx"),
               RequestResult(4, scheduled_s=9)]  # never sent
    s = summarize(results, ttft_slo_ms=1000, tbt_slo_ms=100)
    assert s["requests"] == {"scheduled": 5, "sent": 4, "ok": 3, "errors": {"http_5xx": 1}}
    assert s["ttft"]["p50_ms"] == pytest.approx(200.0)
    assert s["duration_s"] == pytest.approx(5.03)  # first send 0 -> last completion 2 + 3.03
    assert s["slo"]["attainment_ttft"] == 0.5  # 2 of 4 sent met TTFT (the failed one counts against)
    assert s["slo"]["attainment_tbt"] == 0.5  # request 1's p90 gap is 0.244 s
    assert s["slo"]["attainment_both"] == 0.25
    assert s["throughput"]["goodput_requests_per_s"] == pytest.approx(1 / 5.03, abs=1e-3)
    assert s["tokens"] == {"input": 30, "output": 12, "output_requested": 12}
    assert s["tbt"]["p50_ms"] == pytest.approx(10.0)


def test_plots_are_written(tmp_path):
    results = [result(i, 0.1 + i / 100, [0.01] * 5, 0.2, sent=i * 0.5) for i in range(20)]
    series = tmp_path / "replicas.jsonl"
    series.write_text('{"t_s": 0, "decode": 1, "prefill": 1}\n{"t_s": 5, "decode": 2, "prefill": 1}\n')
    files = write_plots(results, tmp_path, extra=read_series(series))
    assert len(files) == 3 and all((tmp_path / f).stat().st_size > 5000 for f in files)
    series.write_text('{"decode": 1}\n')
    with pytest.raises(ValueError, match="replicas.jsonl:1: series rows need a 't_s'"):
        read_series(series)
