"""How far the fleet simulator's fluid model is from a per-request simulation, on one service.

Request sizes are drawn from the Azure LLM inference trace 2023 (conversation; Patel et al., Splitwise,
ISCA 2024, CC-BY 4.0; truncated to 4,096 / 1,024 tokens) for the per-request run, and their means feed the
fluid model; both use the instances the oracle picks for the peak, at 30-120 % of that peak.
Writes bench/results/fluid_vs_requests.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.sim.model import SimService  # noqa: E402
from bench.sim.request_sim import compare_with_fluid  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.load.traces import RateShape, from_azure_csv, truncate  # noqa: E402

AZURE = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else AZURE
    rows, _ = from_azure_csv(path)
    sizes = [(r.input_length, r.output_length) for r in truncate(rows, 4096, 1024)]
    svc = SimService("azure-conv", RateShape(mean_rps=20, peak_to_trough=1.0), 0, 0, ttft_slo_s=2.0,
                     tbt_slo_s=0.05)
    comparison = compare_with_fluid(svc, sizes, loads=(0.3, 0.6, 0.9, 1.2), duration_s=600)
    write_result("fluid_vs_requests", {"trace": str(path.name), "service": "llama-8b, L20 prefill, H20 decode",
                                       "slo": {"ttft_s": 2.0, "tbt_s": 0.05}, "rows": comparison,
                                       "max_abs_error_attainment_ttft_to_peak": max(
                                           r["abs_error_attainment_ttft"] for r in comparison if
                                           r["load_fraction_of_peak"] <= 1.0)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
