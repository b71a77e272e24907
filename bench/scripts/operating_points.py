"""The fluid model at the operating points policies run at, against the per-request simulation (both on the same
performance model): prefill at the oracle's own sizing (load 1.0 of the pool it picks), and decode at 0.90-1.00
of its fluid capacity with D = 1, 2 and 6 instances (prefill ample), TBT judged per request both by its mean gap
and by its 99th-percentile gap. Request sizes: the Azure LLM inference trace 2023 (conversation; Patel et al.,
Splitwise, ISCA 2024; CC-BY 4.0), truncated to 4,096 / 1,024 tokens. Writes bench/results/operating_points.json.
Usage: operating_points.py [--quick] (--quick: shorter runs, one seed; what the test suite runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.load.traces import RateShape, from_azure_csv, truncate  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.sim.model import Capacity, SimService, evaluate, oracle_counts  # noqa: E402
from bench.sim.request_sim import simulate_requests, with_sizes  # noqa: E402

AZURE = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
DECODE_LOADS = (0.90, 0.94, 0.96, 0.98, 1.00)
DECODE_COUNTS = (1, 2, 6)


def operating_points(sizes, duration_s: float = 240.0, seeds=(0, 1)) -> dict:
    base = SimService("azure-8b", RateShape(mean_rps=1.0, peak_to_trough=1.0), 0, 0, ttft_slo_s=2.0, tbt_slo_s=0.05)
    svc = with_sizes(base, sizes)
    cap = Capacity.of(svc)
    out = {"service": "llama-8b, L20 prefill, H20 decode, TTFT 2 s, TBT 50 ms", "duration_s": duration_s,
           "seeds": list(seeds), "prefill_at_oracle_sizing": [], "decode_near_capacity": []}
    for rps in (20.0, 60.0):  # the oracle's own pool at load 1.0, small and larger
        p, d = oracle_counts(svc, cap, rps)
        d = d + 2  # decode ample: the check is prefill's
        fluid = evaluate(svc, cap, rps, p, d)
        runs = [simulate_requests(svc, cap, p, d, rps, sizes, duration_s, seed) for seed in seeds]
        exact = sum(r["attainment_ttft"] for r in runs) / len(runs)
        out["prefill_at_oracle_sizing"].append({"rps": rps, "prefill": p, "decode": d,
                                                "fluid_attainment_ttft": round(fluid.attainment_ttft, 4),
                                                "per_request_attainment_ttft": round(exact, 4),
                                                "fluid_minus_per_request": round(fluid.attainment_ttft - exact, 4)})
    # Decode: a decode-heavy mix whose capacity the TBT SLO sets (with Azure sizes an H20 runs out of KV cache
    # first, below the TBT limit, and the per-request run has no KV limit: no comparison there).
    heavy_sizes = [(200, 600), (400, 800)]
    heavy = with_sizes(base, heavy_sizes)
    heavy_cap = Capacity.of(heavy)
    out["decode_mix"] = "decode-heavy: (200, 600) and (400, 800) prompt/output tokens"
    for d in DECODE_COUNTS:
        for load in DECODE_LOADS:
            rps = load * d * heavy_cap.cap_decode_tps / heavy.mean_output
            p = heavy_cap.prefill_needed(rps) + 2  # prefill ample: the check is decode's
            fluid = evaluate(heavy, heavy_cap, rps, p, d)
            runs = [simulate_requests(heavy, heavy_cap, p, d, rps, heavy_sizes, duration_s, seed)
                    for seed in seeds]
            mean_gap = sum(r["attainment_tbt"] for r in runs) / len(runs)
            p99_gap = sum(r["attainment_tbt_p99_gap"] for r in runs) / len(runs)
            out["decode_near_capacity"].append({
                "decode": d, "load_of_fluid_capacity": load, "fluid_attainment_tbt": round(fluid.attainment_tbt, 4),
                "per_request_attainment_tbt_mean_gap": round(mean_gap, 4),
                "per_request_attainment_tbt_p99_gap": round(p99_gap, 4)})
    return out


def main() -> int:
    quick = "--quick" in sys.argv
    rows, _ = from_azure_csv(AZURE)
    sizes = [(r.input_length, r.output_length) for r in truncate(rows, 4096, 1024)]
    out = operating_points(sizes, 120.0 if quick else 300.0, (0,) if quick else (0, 1))
    write_result("operating_points", out)
    for row in out["prefill_at_oracle_sizing"]:
        print(f"prefill {row['prefill']} at {row['rps']} req/s: fluid {row['fluid_attainment_ttft']}, "
              f"per request {row['per_request_attainment_ttft']}")
    for row in out["decode_near_capacity"]:
        print(f"D={row['decode']} at {row['load_of_fluid_capacity']:.2f}: fluid {row['fluid_attainment_tbt']}, "
              f"per request mean gap {row['per_request_attainment_tbt_mean_gap']}, "
              f"p99 gap {row['per_request_attainment_tbt_p99_gap']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
