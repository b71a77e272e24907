"""Per-request results and the summary statistics of a load test (pure: no HTTP, no clock)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from common.histogram import percentile


@dataclass
class RequestResult:
    index: int
    scheduled_s: float  # when the trace wanted it sent (relative to the run's start)
    sent_s: float | None = None
    input_tokens: int = 0
    requested_output_tokens: int = 0
    status: str = "not_sent"  # ok | http_4xx | http_5xx | timeout | connection | incomplete | cancelled
    http_status: int | None = None
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def tbt_p90_s(self) -> float | None:
        return percentile(self.itls_s, 0.9) if self.itls_s else None


def _dist_ms(values: Sequence[float]) -> dict:
    return {f"p{int(q * 100)}_ms": (None if not values else round(percentile(values, q) * 1000, 3))
            for q in (0.5, 0.9, 0.99)} | {"mean_ms": round(sum(values) / len(values) * 1000, 3) if values else None}


def summarize(results: Sequence[RequestResult], ttft_slo_ms: float, tbt_slo_ms: float) -> dict:
    """Throughput, goodput, latency percentiles, SLO attainment and errors of one run.

    TBT attainment is judged per request on its p90 inter-chunk gap; goodput counts requests that met both SLOs.
    Rates divide by the span from the first send to the last completion."""
    sent = [r for r in results if r.sent_s is not None]
    ok = [r for r in sent if r.ok]
    ends = [r.sent_s + r.e2e_s for r in sent if r.e2e_s is not None]
    span = (max(ends) - min(r.sent_s for r in sent)) if sent and ends else 0.0
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [g for r in ok for g in r.itls_s]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    met_ttft = [r for r in ok if r.ttft_s is not None and r.ttft_s * 1000 <= ttft_slo_ms]
    met_tbt = [r for r in ok if (r.tbt_p90_s() or 0.0) * 1000 <= tbt_slo_ms]
    met_both = [r for r in met_ttft if (r.tbt_p90_s() or 0.0) * 1000 <= tbt_slo_ms]
    denominator = len(sent) or 1  # failed requests count against attainment
    lateness = [r.sent_s - r.scheduled_s for r in sent]
    return {
        "requests": {"scheduled": len(results), "sent": len(sent), "ok": len(ok),
                     "errors": dict(Counter(r.status for r in sent if not r.ok))},
        "duration_s": round(span, 3),
        "throughput": {
            "requests_per_s": round(len(ok) / span, 3) if span else 0.0,
            "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / span, 3) if span else 0.0,
            "input_tokens_per_s": round(sum(r.input_tokens for r in ok) / span, 3) if span else 0.0,
            "goodput_requests_per_s": round(len(met_both) / span, 3) if span else 0.0,
        },
        "tokens": {"input": sum(r.input_tokens for r in ok), "output": sum(r.output_tokens for r in ok),
                   "output_requested": sum(r.requested_output_tokens for r in ok)},
        "ttft": _dist_ms(ttfts), "tbt": _dist_ms(itls), "e2e": _dist_ms(e2es),
        "slo": {"ttft_ms": ttft_slo_ms, "tbt_ms": tbt_slo_ms, "tbt_rule": "per-request p90 inter-chunk gap",
                "attainment_ttft": round(len(met_ttft) / denominator, 4),
                "attainment_tbt": round(len(met_tbt) / denominator, 4),
                "attainment_both": round(len(met_both) / denominator, 4)},
        "send_lateness": _dist_ms(lateness),  # > 0 when max-concurrency or the client held requests back
    }
