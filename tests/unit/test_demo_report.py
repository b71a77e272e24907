"""The autoscaling demo's report (summary.json fields, timeline.png) from a synthetic decision log and results."""

from __future__ import annotations

import pytest

from bench.load.stats import RequestResult
from heteroscale_ray.autoscale_demo import (PHASES, concrete_phases, curated, demo_trace, forecast_period_s,
                                            phase_starts, plot_timeline, ready_before, summarize)


def entry(t, action, p, d, groups, tps, reason="proportional", diagnostics=None):
    counts = lambda n: {"ready": n, "pending": 0, "withdrawn": 0}  # noqa: E731
    return {"t": t, "tick": int(t), "action": action, "reason": reason, "advisory": False,
            "diagnostics": diagnostics or {},
            "target_prefill": p, "target_decode": d, "target_decode_tps_per_instance": 100.0,
            "observation": {"decode_tps": tps, "ttft_s": 0.5, "tbt_s": None, "prefill": counts(p),
                            "decode": counts(d)},
            "groups": [{"name": f"g{i}", "prefill": counts(1), "decode": counts(1)} for i in range(groups)]}


def test_summary_counts_actions_instance_seconds_and_failures(tmp_path):
    decisions = [entry(0, "hold", 1, 1, 1, 50.0, diagnostics={"prefill_per_decode": 1.0}),
                 entry(10, "scale_out", 2, 2, 2, 250.0, diagnostics={"prefill_per_decode": 1.0}),
                 entry(20, "scale_in", 2, 2, 2, 20.0), entry(30, "restore", 2, 2, 2, 200.0, reason="forecast",
                                                           diagnostics={"forecast_decode_tps": 230.0}),
                 entry(40, "terminate_withdrawn", 1, 1, 1, None, diagnostics={"prefill_per_decode": 2.5,
                                                                               "ratio_estimate": 2.6}),
                 entry(50, "hold", 1, 1, 1, 10.0)]
    results = [RequestResult(i, float(i), sent_s=float(i), status="ok", ttft_s=0.2, itls_s=[0.01], e2e_s=1.0,
                             output_tokens=8) for i in range(5)]
    results.append(RequestResult(5, 5.0, sent_s=5.0, status="http_5xx"))
    s = summarize(results, decisions, ttft_slo_s=1.0, tbt_slo_s=0.2)
    assert (s["num_scale_out"], s["num_scale_in"], s["num_restore"], s["num_terminate"]) == (1, 1, 1, 1)
    assert s["instance_seconds"] == {"prefill": 10 + 20 * 3 + 10, "decode": 10 + 20 * 3 + 10}
    assert s["failed_requests"] == 1 and s["requests_sent"] == 6 and s["max_deployment_groups"] == 2
    assert s["slo_attainment_ttft"] == round(5 / 6, 4)
    assert (s["prefill_per_decode_min"], s["prefill_per_decode_max"], s["num_prewarm"]) == (1.0, 2.5, 1)
    assert s["num_forecast_holds"] == 0
    assert ready_before(decisions, 25.0) == {"prefill": 2, "decode": 2} and ready_before(decisions, -1.0) is None
    plot_timeline(results, decisions, tmp_path / "timeline.png", 1.0, 0.2, load_start_s=-5.0,
                  phase_marks={"light": 0.0, "ramp": 20.0})
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_demo_trace_follows_its_phases_from_the_curated_target_and_is_seeded():
    phases = concrete_phases(200.0)
    rows = demo_trace(phases)
    assert rows == demo_trace(phases) and len(rows) > 100
    starts = phase_starts()
    def window(name):
        p = next(p for p in PHASES if p.name == name)
        return [r for r in rows if starts[name] * 1000 <= r.timestamp_ms < (starts[name] + p.duration_s) * 1000]
    light, heavy, ramp = window("light"), window("prompt-heavy"), window("ramp")
    # the ramp asks for more than one decode replica's target; prompt-heavy keeps decode and multiplies prompts
    assert len(ramp) * 96 / 60 > 1.2 * 200 and len(light) * 96 / 30 < 200
    assert {r.input_length for r in heavy} == {1000} and {r.input_length for r in light} == {200}
    assert forecast_period_s() == starts["ramp again"] - starts["ramp"] > 0
    with pytest.raises(ValueError, match="target_decode_tps"):
        concrete_phases(0.0)


def test_the_demo_runs_the_controller_on_the_profiles_numbers_and_its_own_time_scale():
    from common.config import load_service_spec
    from tests.conftest import EXAMPLES

    service = load_service_spec(EXAMPLES / "service-local.yaml")
    profile = {"autoscaling": {"target_decode_tps_per_instance": 173.2, "prefill_per_decode": 0.9,
                               "target_prefill_tps_per_instance": 401.0, "ttft_slo_s": 2.0, "tbt_slo_s": 0.2}}
    a = curated(service, profile).autoscaling
    assert (a.target_decode_tps_per_instance, a.prefill_per_decode, a.target_prefill_tps_per_instance) == \
        (173.2, 0.9, 401.0)
    assert a.forecast_period_s == forecast_period_s() and a.enabled and not a.advisory
    assert a.max_decode == service.autoscaling.max_decode  # the rest as the service has it


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
    assert "forecast peak 420 decode tokens/s within 165s (error 8 %)" in format_status(report)
    ctl["forecast"] = {"decode_tps": None, "error": None, "startup_s": None, "history_bins": 0}
    assert "forecast: none yet (0 bins of history, no start-up measured)" in format_status(report)
    report["controller"] = None
    assert "no controller" in format_status(report)


def test_the_demo_refuses_a_service_that_does_not_start_from_one_1p1d_group():
    from dataclasses import replace

    from common.config import load_service_spec
    from heteroscale_ray.autoscale_demo import run
    from tests.conftest import EXAMPLES

    service = load_service_spec(EXAMPLES / "service-local.yaml")
    two = replace(service, deployment_groups=(replace(service.deployment_groups[0], num_prefill=2),))
    with pytest.raises(ValueError, match=r"one 1P\+1D deployment group, got \[\('dg-a', 2, 1\)\]"):
        run(None, two, None, progress=lambda _: None)
