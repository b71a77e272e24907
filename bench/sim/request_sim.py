"""Per-request discrete-event simulation of one P/D service, to check the fleet simulator's fluid model.

Requests arrive as a Poisson process with sizes drawn from given (input, output) rows (e.g. the Azure trace).
Prefill instances take queued requests FCFS in passes of up to `PREFILL_CHUNK_TOKENS` prompt tokens (pass time
from the performance model); the KV then moves to the decode instance with the fewest running requests
(transfer time from the model); decode instances run continuous-batching steps whose duration is the model's
step time for the current batch. TTFT = arrival -> first decode token; TBT = the gaps between a request's
tokens. Bounded by `max_requests` and a drain limit. Pure Python; no clock.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, replace
from typing import Sequence

from bench.sim.model import PREFILL_CHUNK_TOKENS, Capacity, SimService, evaluate, size_bins
from bench.sim.perf_model import GPUS, MODELS, kv_transfer_time_s
from common.histogram import percentile


@dataclass
class _Req:
    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    max_gap: float = 0.0
    gaps_over: int = 0


def simulate_requests(svc: SimService, cap: Capacity, num_prefill: int, num_decode: int, rps: float,
                      sizes: Sequence[tuple[int, int]], duration_s: float = 600.0, seed: int = 0,
                      max_requests: int = 200_000) -> dict:
    if min(num_prefill, num_decode) < 1 or rps <= 0:
        raise ValueError(f"need >= 1 instance per role and rps > 0 (got P={num_prefill}, D={num_decode}, rps={rps})")
    rng = random.Random(seed)
    model = MODELS[svc.model]
    reqs: list[_Req] = []
    t = 0.0
    while len(reqs) < max_requests:
        t += rng.expovariate(rps)
        if t >= duration_s:
            break
        n_in, n_out = sizes[rng.randrange(len(sizes))]
        reqs.append(_Req(t, n_in, max(1, n_out)))
    events: list[tuple[float, int, str, int]] = []
    seq = 0

    def push(at: float, kind: str, idx: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, idx))

    for i, req in enumerate(reqs):
        push(req.arrival, "arrive", i)
    prefill_queue: list[int] = []
    prefill_free = list(range(num_prefill))
    batches: dict[int, list[int]] = {}
    running: list[list[int]] = [[] for _ in range(num_decode)]
    joining: list[list[int]] = [[] for _ in range(num_decode)]
    stepping = [False] * num_decode

    def start_prefill(now: float) -> None:
        while prefill_free and prefill_queue:
            server = prefill_free.pop()
            batch, tokens = [], 0
            while prefill_queue and (not batch or tokens + reqs[prefill_queue[0]].input_len <= PREFILL_CHUNK_TOKENS):
                idx = prefill_queue.pop(0)
                batch.append(idx)
                tokens += reqs[idx].input_len
            batches[server] = batch
            push(now + cap.prefill.prefill_time_s([reqs[i].input_len for i in batch])[0], "prefill_done", server)

    def start_step(d: int, now: float) -> None:
        running[d].extend(joining[d])
        joining[d].clear()
        if not running[d]:
            stepping[d] = False
            return
        stepping[d] = True
        contexts = [reqs[i].input_len + reqs[i].tokens for i in running[d]]
        push(now + cap.decode.decode_step_time_s(contexts)[0], "step_end", d)

    guard = 0
    while events and guard < 50_000_000:
        guard += 1
        now, _, kind, idx = heapq.heappop(events)
        if kind == "arrive":
            prefill_queue.append(idx)
            start_prefill(now)
        elif kind == "prefill_done":
            for i in batches.pop(idx):
                push(now + kv_transfer_time_s(model, reqs[i].input_len, GPUS[svc.prefill_gpu]), "kv_ready", i)
            prefill_free.append(idx)
            start_prefill(now)
        elif kind == "kv_ready":
            d = min(range(num_decode), key=lambda k: (len(running[k]) + len(joining[k]), k))
            joining[d].append(idx)
            if not stepping[d]:
                start_step(d, now)
        elif kind == "step_end":
            still = []
            for i in running[idx]:
                req = reqs[i]
                if req.first_token is None:
                    req.first_token = now
                else:
                    gap = now - req.last_token
                    req.max_gap = max(req.max_gap, gap)
                    req.gaps_over += gap > svc.tbt_slo_s
                req.last_token = now
                req.tokens += 1
                if req.tokens < req.output_len:
                    still.append(i)
            running[idx] = still
            start_step(idx, now)
    done = [r for r in reqs if r.tokens == r.output_len]
    ttfts = [r.first_token - r.arrival for r in done]
    mean_tbts = [(r.last_token - r.first_token) / (r.output_len - 1) for r in done if r.output_len > 1]
    multi = [r for r in done if r.output_len > 1]
    return {
        "requests": len(reqs), "completed": len(done),
        "attainment_ttft": sum(t <= svc.ttft_slo_s for t in ttfts) / max(len(reqs), 1),
        "attainment_tbt": sum(t <= svc.tbt_slo_s for t in mean_tbts) / max(len(mean_tbts), 1),
        # a request meets a p99-gap TBT SLO when at most 1 % of its gaps exceed the SLO
        "attainment_tbt_p99_gap": sum(r.gaps_over <= 0.01 * (r.output_len - 1) for r in multi) / max(len(multi), 1),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
        "mean_tbt_p50_s": percentile(mean_tbts, 0.5),
    }


def with_sizes(svc: SimService, sizes: Sequence[tuple[int, int]]) -> SimService:
    """The service with this request-size distribution (its bins and means)."""

    return replace(svc, mean_input=round(sum(s[0] for s in sizes) / len(sizes)),
                   mean_output=round(sum(s[1] for s in sizes) / len(sizes)), sizes=size_bins(sizes))


def compare_with_fluid(svc: SimService, sizes: Sequence[tuple[int, int]], loads: Sequence[float] = (0.3, 0.6, 0.9),
                       duration_s: float = 600.0, seed: int = 0) -> list[dict]:
    """Fluid vs per-request results for one service at fractions of its peak load, on the instances the oracle
    would use at the peak. The fluid model sees the sizes' distribution as bins (`size_bins`); the per-request
    run draws each request."""
    from bench.sim.model import oracle_counts

    fluid_svc = with_sizes(svc, sizes)
    means_svc = replace(fluid_svc, sizes=())  # the same means, no distribution: what the tail changes
    cap, means_cap = Capacity.of(fluid_svc), Capacity.of(means_svc)
    peak = svc.shape.max_rate()
    num_prefill, num_decode = oracle_counts(fluid_svc, cap, peak)
    rows = []
    for fraction in loads:
        rps = peak * fraction
        fluid = evaluate(fluid_svc, cap, rps, num_prefill, num_decode)
        means_only = evaluate(means_svc, means_cap, rps, num_prefill, num_decode)
        exact = simulate_requests(fluid_svc, cap, num_prefill, num_decode, rps, sizes, duration_s, seed)
        rows.append({
            "load_fraction_of_peak": fraction, "rps": round(rps, 3), "instances": [num_prefill, num_decode],
            "fluid": {"attainment_ttft": round(fluid.attainment_ttft, 4), "attainment_tbt": round(fluid.attainment_tbt, 4),
                      "ttft_p90_s": round(fluid.ttft_p90_s, 4), "tbt_s": round(fluid.tbt_s, 5)},
            "fluid_means_only_attainment_ttft": round(means_only.attainment_ttft, 4),
            "per_request": {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                            for k, v in exact.items()},
            "abs_error_attainment_ttft": round(abs(fluid.attainment_ttft - exact["attainment_ttft"]), 4),
            "abs_error_attainment_tbt": round(abs(fluid.attainment_tbt - exact["attainment_tbt"]), 4),
        })
    return rows
