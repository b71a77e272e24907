"""Overload with real engines: admission control on vs off, side by side in one run on the local labelled cluster
(one deployment group, 1 prefill + 1 decode vLLM engine, fixed replica counts). Writes
bench/results/reliability.json under `overload_bound_<bound>` (other keys: what the fault and fuzz tests measured).

1. capacity: open-loop at a rate well past what the group serves, admission on: the admitted throughput is the
   group's capacity at the bound (ok requests per second);
2. overload, admission on: open-loop Poisson arrivals at 2x that capacity: sent = ok + shed + failed, the shed
   share, p99 TTFT/TBT of the admitted requests against the SLOs, the longest request against its timeout;
3. the same arrivals with admission off (the ingress redeployed with no bound; the engines stay): the baseline.

    .venv/bin/python bench/scripts/reliability.py      # ~8 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.load import loadgen  # noqa: E402
from common.histogram import percentile  # noqa: E402
from bench.load.traces import TraceRequest  # noqa: E402
from bench.results_io import merge_result  # noqa: E402
from common.config import parse_cluster_spec, parse_service_spec  # noqa: E402
from heteroscale_ray import local_cluster  # noqa: E402
from heteroscale_ray import service as svc  # noqa: E402

TEMP_DIR = "/tmp/hsray-bench-reliability"
PORT = 8019
TTFT_SLO_S, TBT_SLO_S = 2.0, 0.2
INPUT_TOKENS, OUTPUT_TOKENS = 64, 32
TIMEOUT_S = 60.0


def arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[TraceRequest]:
    rng, t, out = random.Random(seed), 0.0, []
    while len(out) < 5000:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            break
        out.append(TraceRequest(t * 1000.0, INPUT_TOKENS, OUTPUT_TOKENS))
    return out


def run_load(trace: list[TraceRequest], prompts: list[str]) -> list:
    cfg = loadgen.LoadConfig(url=f"http://127.0.0.1:{PORT}", request_timeout_s=TIMEOUT_S, drain_timeout_s=TIMEOUT_S + 30,
                             ttft_slo_ms=TTFT_SLO_S * 1000, tbt_slo_ms=TBT_SLO_S * 1000, max_requests=len(trace))
    planned = loadgen.plan(cfg, trace)
    asyncio.run(loadgen.replay(cfg, planned, prompts))
    return [result for _, result in planned]


def account(results: list, duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    shed = [r for r in results if r.http_status == 429]
    failed = [r for r in results if not r.ok and r.http_status != 429]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tbts = [gap for r in ok for gap in r.itls_s]
    longest = max((r.e2e_s or 0.0 for r in results), default=0.0)
    return {
        "sent": len(results), "ok": len(ok), "shed": len(shed), "failed": len(failed),
        "failed_by_status": {s: sum(1 for r in failed if r.status == s) for s in sorted({r.status for r in failed})},
        "accounted": len(ok) + len(shed) + len(failed) == len(results),
        "shed_share": round(len(shed) / max(len(results), 1), 4),
        "admitted_per_s": round(len(ok) / duration_s, 3),
        "admitted_ttft_p50_s": round(percentile(ttfts, 0.5), 3) if ttfts else None,
        "admitted_ttft_p99_s": round(percentile(ttfts, 0.99), 3) if ttfts else None,
        "admitted_tbt_p99_s": round(percentile(tbts, 0.99), 4) if tbts else None,
        "admitted_ttft_attainment": round(sum(t <= TTFT_SLO_S for t in ttfts) / max(len(ttfts), 1), 4),
        "longest_request_s": round(longest, 2), "request_timeout_s": TIMEOUT_S,
        "hung_past_timeout": sum(1 for r in results if (r.e2e_s or 0.0) > TIMEOUT_S + 5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bound", type=int, default=4, help="max_inflight_per_decode_replica with admission on")
    parser.add_argument("--probe-rate", type=float, default=6.0, help="req/s of the capacity step")
    parser.add_argument("--probe-s", type=float, default=30.0)
    parser.add_argument("--overload-s", type=float, default=60.0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt

    cluster_data = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    cluster_data["head"].update(gcs_port=6407, dashboard_port=8289)
    service_data = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())
    service_data.pop("autoscaling", None)  # fixed replicas: the overload is the ingress's to handle
    service_data["ingress"].update(port=PORT, api_key=None, api_key_env=None, request_timeout_s=TIMEOUT_S,
                                   max_inflight_per_decode_replica=args.bound)
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    state = local_cluster.up(parse_cluster_spec(cluster_data), temp_dir=TEMP_DIR)
    started = time.time()
    try:
        spec = parse_service_spec(service_data)
        svc.deploy(spec, state.address, timeout_s=600, progress=lambda m: print(m, file=sys.stderr))

        def prompts_for(trace):
            return loadgen.build_prompts(trace, tokenizer, make_prompt)

        probe = arrivals(args.probe_rate, args.probe_s, seed=1)
        print(f"capacity step: {len(probe)} requests at {args.probe_rate} req/s", file=sys.stderr)
        capacity = account(run_load(probe, prompts_for(probe)), args.probe_s)
        capacity_rps = capacity["admitted_per_s"]
        if capacity_rps <= 0:
            raise RuntimeError(f"no request was admitted in the capacity step: {capacity}")
        overload = arrivals(2 * capacity_rps, args.overload_s, seed=2)
        prompts = prompts_for(overload)
        print(f"overload, admission on: {len(overload)} requests at {2 * capacity_rps:.2f} req/s", file=sys.stderr)
        on = account(run_load(overload, prompts), args.overload_s)
        service_data["ingress"]["max_inflight_per_decode_replica"] = None
        svc.deploy(parse_service_spec(service_data), state.address, timeout_s=600,
                   progress=lambda m: print(m, file=sys.stderr))
        print("overload, admission off (baseline): the same arrivals", file=sys.stderr)
        off = account(run_load(overload, prompts), args.overload_s)
        figures = {
            "setup": {"engines": "1 prefill + 1 decode vLLM (CPU, tiny model), one deployment group",
                      "bound_per_decode_replica": args.bound, "input_tokens": INPUT_TOKENS,
                      "output_tokens": OUTPUT_TOKENS, "ttft_slo_s": TTFT_SLO_S, "tbt_slo_s": TBT_SLO_S},
            "capacity": {"offered_per_s": args.probe_rate, **capacity},
            "offered_per_s": round(2 * capacity_rps, 3), "admission_on": on, "admission_off": off,
            "ratios": {"ttft_p99_off_over_on": round(off["admitted_ttft_p99_s"] / on["admitted_ttft_p99_s"], 2)
                       if on["admitted_ttft_p99_s"] and off["admitted_ttft_p99_s"] else None},
            "wall_s": round(time.time() - started, 1),
        }
        print(json.dumps(figures, indent=2))
        merge_result("reliability", f"overload_bound_{args.bound}", figures)  # one key per bound
        return 0
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


if __name__ == "__main__":
    sys.exit(main())
