"""The autoscaling demo's report (summary.json fields, timeline.png) from a synthetic decision log and results."""

from __future__ import annotations

from bench.load.stats import RequestResult
from heteroscale_ray.autoscale_demo import PHASES, demo_trace, plot_timeline, summarize


def entry(t, action, p, d, groups, tps):
    counts = lambda n: {"ready": n, "pending": 0, "withdrawn": 0}  # noqa: E731
    return {"t": t, "tick": int(t), "action": action, "reason": "proportional", "advisory": False,
            "target_prefill": p, "target_decode": d, "target_decode_tps_per_instance": 100.0,
            "observation": {"decode_tps": tps, "ttft_s": 0.5, "tbt_s": None, "prefill": counts(p),
                            "decode": counts(d)},
            "groups": [{"name": f"g{i}", "prefill": counts(1), "decode": counts(1)} for i in range(groups)]}


def test_summary_counts_actions_instance_seconds_and_failures(tmp_path):
    decisions = [entry(0, "hold", 1, 1, 1, 50.0), entry(10, "scale_out", 2, 2, 2, 250.0),
                 entry(20, "scale_in", 2, 2, 2, 20.0), entry(30, "restore", 2, 2, 2, 200.0),
                 entry(40, "terminate_withdrawn", 1, 1, 1, None), entry(50, "hold", 1, 1, 1, 10.0)]
    results = [RequestResult(i, float(i), sent_s=float(i), status="ok", ttft_s=0.2, itls_s=[0.01], e2e_s=1.0,
                             output_tokens=8) for i in range(5)]
    results.append(RequestResult(5, 5.0, sent_s=5.0, status="http_5xx"))
    s = summarize(results, decisions, ttft_slo_s=1.0, tbt_slo_s=0.2)
    assert (s["num_scale_out"], s["num_scale_in"], s["num_restore"], s["num_terminate"]) == (1, 1, 1, 1)
    assert s["instance_seconds"] == {"prefill": 10 + 20 * 3 + 10, "decode": 10 + 20 * 3 + 10}
    assert s["failed_requests"] == 1 and s["requests_sent"] == 6 and s["max_deployment_groups"] == 2
    assert s["slo_attainment_ttft"] == round(5 / 6, 4)
    plot_timeline(results, decisions, tmp_path / "timeline.png", 1.0, 0.2, load_start_s=-5.0)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_demo_trace_follows_its_phases_and_is_seeded():
    rows = demo_trace()
    assert rows == demo_trace() and len(rows) > 100
    first_phase = [r for r in rows if r.timestamp_ms < PHASES[0][0] * 1000]
    heavy = [r for r in rows if PHASES[0][0] * 1000 <= r.timestamp_ms < (PHASES[0][0] + PHASES[1][0]) * 1000]
    assert len(heavy) / PHASES[1][0] > 3 * len(first_phase) / PHASES[0][0]


def test_status_text_shows_groups_replicas_targets_and_decisions():
    from heteroscale_ray.service import format_status

    counts = lambda r, w, p: {"ready": r, "withdrawn": w, "pending": p}  # noqa: E731
    report = {"service": "tiny-chat", "ingress": "RUNNING", "applications": {}, "controller": {
        "advisory": False, "ticks": 12, "control_period_s": 5.0, "target_prefill": 2, "target_decode": 2,
        "soft_scale_in": None, "errors": {},
        "groups": [{"name": "dg-a", "domain": "s1-a", "prefill_gpu_type": "L20", "decode_gpu_type": "H20",
                    "target_prefill": 1, "target_decode": 1, "prefill": counts(1, 0, 0), "decode": counts(0, 1, 0)}],
        "last_decisions": [{"t": 100.0, "action": "scale_in", "reason": "proportional", "target_prefill": 1,
                            "target_decode": 1, "observation": {"decode_tps": 42.0},
                            "actions": [{"kind": "withdraw", "group": "dg-a", "num_prefill": 1, "num_decode": 1,
                                         "withdrawn_prefill": 0, "withdrawn_decode": 1}]}]}}
    text = format_status(report)
    assert "dg-a" in text and "s1-a" in text and "L20/H20" in text and "targets P=2 D=2" in text
    assert "scale_in (proportional) decode_tps=42" in text and "withdrawn 0P/1D" in text
    ctl = report["controller"]
    ctl.update(prefill_per_decode=1.5, ratio_estimate=1.62, adaptive_ratio=True)
    ctl["last_decisions"][0]["diagnostics"] = {"prefill_per_decode": 1.5}
    text = format_status(report)
    assert "P:D 1.5 (adaptive, asked 1.62)" in text and "-> P=1 D=1 at P:D 1.5" in text
    ctl["forecast"] = {"decode_tps": 420.0, "error": 0.08, "startup_s": 165.0, "history_bins": 12}
    assert "forecast 420 decode tokens/s 165s ahead (error 8 %)" in format_status(report)
    ctl["forecast"] = {"decode_tps": None, "error": None, "startup_s": None, "history_bins": 0}
    assert "forecast: none yet (0 bins of history, no start-up measured)" in format_status(report)
    report["controller"] = None
    assert "no controller" in format_status(report)
