"""Policy curation by stress test (paper Algorithm 1, first half): step a live P/D endpoint through rising
request rates, find the highest decode tokens/s per decode instance that keeps TBT within its SLO and the
highest prompt tokens/s per prefill instance that keeps TTFT within its SLO, and derive the `autoscaling`
section: the P:D ratio that meets both SLOs and the per-instance decode target with headroom.

`analyze()` is pure (steps in, numbers out); `run()` steps the endpoint with the open-loop load generator
(loopback in tests) and analyzes; `heteroscale profile` and `make demo` call it (the CLI writes
`profile.json`, `profile.png` and the YAML).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from bench.load.stats import RequestResult
from common.histogram import percentile


@dataclass(frozen=True)
class Step:
    """What one rate step measured (the endpoint ran `num_prefill` and `num_decode` replicas)."""

    rate_rps: float
    duration_s: float
    requests: int
    failed: int
    decode_tps: float  # output tokens/s served
    prefill_tps: float  # prompt tokens/s served
    ttft_p90_s: float | None
    tbt_p90_s: float | None
    # requests in flight on average (Little's law: summed time in the role / the step's span): prefill until the
    # first token, decode from the first token to the last (what Ray Serve's ongoing-requests count sees)
    prefill_in_flight: float | None = None
    decode_in_flight: float | None = None

    @classmethod
    def of(cls, rate_rps: float, results: Sequence[RequestResult]) -> Step:
        sent = [r for r in results if r.sent_s is not None]
        ok = [r for r in sent if r.ok]
        ends = [r.sent_s + r.e2e_s for r in ok if r.e2e_s is not None]
        span = max(ends) - min(r.sent_s for r in sent) if ok and ends else 0.0
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tbts = [r.tbt_p90_s() for r in ok if r.tbt_p90_s() is not None]
        timed = [r for r in ok if r.ttft_s is not None and r.e2e_s is not None]
        return cls(rate_rps, round(span, 3), len(sent), len(sent) - len(ok),
                   sum(r.output_tokens for r in ok) / span if span else 0.0,
                   sum(r.input_tokens for r in ok) / span if span else 0.0,
                   percentile(ttfts, 0.9) if ttfts else None, percentile(tbts, 0.9) if tbts else None,
                   sum(r.ttft_s for r in timed) / span if span else None,
                   sum(r.e2e_s - r.ttft_s for r in timed) / span if span else None)


def analyze(steps: Sequence[Step], num_prefill: int, num_decode: int, ttft_slo_s: float, tbt_slo_s: float,
            mean_input: float, mean_output: float, headroom: float = 0.9) -> dict:
    """Per-instance capacities within the SLOs and the resulting `autoscaling` values.

    A step meets an SLO when no request failed and its p90 is within the SLO. Capacity per instance = what
    the highest step meeting that role's SLO served / the role's replicas. If even the highest step met it,
    the capacity is a lower bound (`*_limit_reached: false`): step higher for a tighter number."""
    if num_prefill < 1 or num_decode < 1:
        raise ValueError(f"num_prefill ({num_prefill}) and num_decode ({num_decode}) must be >= 1")
    if not steps:
        raise ValueError("no steps to analyze")
    ordered = sorted(steps, key=lambda s: s.rate_rps)
    ok_tbt = [s for s in ordered if not s.failed and s.tbt_p90_s is not None and s.tbt_p90_s <= tbt_slo_s]
    ok_ttft = [s for s in ordered if not s.failed and s.ttft_p90_s is not None and s.ttft_p90_s <= ttft_slo_s]
    if not ok_tbt or not ok_ttft:
        raise ValueError(f"even the lowest rate ({ordered[0].rate_rps} req/s) misses "
                         f"{'the TBT' if not ok_tbt else 'the TTFT'} SLO: step lower or relax the SLO")
    decode_cap = ok_tbt[-1].decode_tps / num_decode
    prefill_cap = ok_ttft[-1].prefill_tps / num_prefill
    target = headroom * decode_cap
    ratio = (target / mean_output) * mean_input / prefill_cap  # prefill instances per decode instance at target
    return {
        "decode_tps_per_instance_within_tbt_slo": round(decode_cap, 2),
        "prefill_tps_per_instance_within_ttft_slo": round(prefill_cap, 2),
        "decode_limit_reached": ok_tbt[-1] is not ordered[-1],
        "prefill_limit_reached": ok_ttft[-1] is not ordered[-1],
        "autoscaling": {"target_decode_tps_per_instance": round(target, 1),
                        "prefill_per_decode": round(max(ratio, 0.01), 3),
                        # the adaptive ratio's prefill target: prompt tokens/s per prefill replica within the
                        # TTFT SLO (the profile's prompts share no prefix, so all of them are KV misses)
                        "target_prefill_tps_per_instance": round(prefill_cap, 1),
                        "ttft_slo_s": ttft_slo_s, "tbt_slo_s": tbt_slo_s},
        # the same operating points in Ray Serve's knob (ongoing requests per replica, with the same headroom):
        # what its per-deployment autoscaling gets when tuned from this profile (None: the step lacks timings)
        "serve_target_ongoing_requests": {
            "prefill": _per_replica(ok_ttft[-1].prefill_in_flight, num_prefill, headroom),
            "decode": _per_replica(ok_tbt[-1].decode_in_flight, num_decode, headroom)},
        "headroom": headroom, "replicas": {"prefill": num_prefill, "decode": num_decode},
        "steps": [asdict(s) for s in ordered],
    }


def _per_replica(in_flight: float | None, replicas: int, headroom: float) -> float | None:
    return None if in_flight is None else round(headroom * in_flight / replicas, 3)


def run(url: str, model: str | None, api_key: str | None, rates: Sequence[float], step_s: float,
        input_tokens: int, output_tokens: int, num_prefill: int, num_decode: int, ttft_slo_s: float,
        tbt_slo_s: float, tokenizer, make_prompt: Callable[..., str], headroom: float = 0.9,
        request_timeout_s: float = 120.0, progress: Callable[[str], None] = print) -> dict:
    """Step the endpoint through `rates` (req/s, ascending), `step_s` each, and `analyze` what it served
    (prompts from `make_prompt(tokenizer, num_tokens, seed=...)`, as `loadgen.build_prompts` takes it)."""
    import asyncio

    from bench.load import loadgen

    if not rates or min(rates) <= 0:
        raise ValueError(f"rates ({list(rates)}) must be positive numbers")
    steps = []
    for i, rate in enumerate(sorted(rates)):
        cfg = loadgen.LoadConfig(url=url.rstrip("/"), model=model, api_key=api_key,
                                 request_timeout_s=request_timeout_s, drain_timeout_s=request_timeout_s,
                                 ttft_slo_ms=1000 * ttft_slo_s, tbt_slo_ms=1000 * tbt_slo_s)
        planned = loadgen.plan(cfg, constant_trace(rate, step_s, input_tokens, output_tokens, seed=i))
        prompts = loadgen.build_prompts([r for r, _ in planned], tokenizer, make_prompt)
        progress(f"profile step {i + 1}/{len(rates)}: {rate:g} req/s for {step_s:g}s ({len(planned)} requests)")
        asyncio.run(loadgen.replay(cfg, planned, prompts))
        step = Step.of(rate, [res for _, res in planned])
        progress(f"  decode {step.decode_tps:.0f} tok/s, prefill {step.prefill_tps:.0f} tok/s, TTFT p90 "
                 f"{step.ttft_p90_s}, TBT p90 {step.tbt_p90_s}, failed {step.failed}")
        steps.append(step)
    return analyze(steps, num_prefill, num_decode, ttft_slo_s, tbt_slo_s, input_tokens, output_tokens,
                   headroom=headroom)


def constant_trace(rate_rps: float, duration_s: float, input_tokens: int, output_tokens: int, seed: int = 0):
    """Poisson arrivals at a fixed rate with fixed sizes (one stress-test step)."""
    import random

    from bench.load.traces import TraceRequest

    rng, t, rows = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate_rps)
        if t >= duration_s:
            return rows
        rows.append(TraceRequest(int(t * 1000), input_tokens, output_tokens))


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    x = [s["decode_tps"] / result["replicas"]["decode"] for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, [s["tbt_p90_s"] or math.nan for s in steps], marker="o")
    axes[0].axhline(result["autoscaling"]["tbt_slo_s"], color="r", linewidth=0.8)
    axes[0].set_xlabel("decode tokens/s per decode instance")
    axes[0].set_ylabel("TBT p90 (s)")
    px = [s["prefill_tps"] / result["replicas"]["prefill"] for s in steps]
    axes[1].plot(px, [s["ttft_p90_s"] or math.nan for s in steps], marker="o")
    axes[1].axhline(result["autoscaling"]["ttft_slo_s"], color="r", linewidth=0.8)
    axes[1].set_xlabel("prompt tokens/s per prefill instance")
    axes[1].set_ylabel("TTFT p90 (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
