"""Router overhead and P/D cost, measured side by side in one run on the same model and local cluster.

Paths (sequential requests, greedy, `ignore_eos`, fixed prompt and output lengths, fresh prompts so no
prefix-cache hits):
  - `router_http_pd`: HTTP -> our ingress -> DG decode -> DG prefill (P/D over NIXL)       [the product]
  - `handle_pd`:      Serve handle -> DG decode -> DG prefill (no HTTP, no ingress)        [engine direct, P/D]
  - `single_engine`:  Serve handle -> the decode engine alone, no remote prefill           [non-disaggregated]
  - `ray_pd_http`:    Ray Serve LLM's `build_pd_openai_app` on the same engines' config   [anchor]
  - `nixl_fix_off_http_pd`: our path with the CPU fixes switched off (HETEROSCALE_CPU_FIXES=0)  [before]
plus a phase breakdown of one P/D request (prefill RPC, KV pull + first token, decode steps) from the engines'
own counters. At most two engines run at a time. Writes bench/results/router_overhead.json.

Usage: python bench/router_overhead.py [--requests N] [--prompt-tokens T] [--max-tokens M]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from common.vocab import group_app_name  # noqa: E402
from heteroscale_ray import local_cluster  # noqa: E402
from heteroscale_ray import service as svc  # noqa: E402
from common.config import parse_cluster_spec, parse_service_spec  # noqa: E402

TEMP_DIR = "/tmp/hsray-bench"
PORT = 8021


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(latencies_s: list[float]) -> dict:
    ms = [v * 1000 for v in latencies_s]
    return {"n": len(ms), "p50_ms": round(_pct(ms, 0.5), 2), "p99_ms": round(_pct(ms, 0.99), 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


class Prompts:
    def __init__(self, model_path: str, tokens: int):
        from transformers import AutoTokenizer

        from heteroscale_ray.tiny_model import make_prompt

        self._tok = AutoTokenizer.from_pretrained(model_path)
        self._make = make_prompt
        self._tokens = tokens
        self._seed = 10_000

    def next(self) -> str:
        self._seed += 1
        return self._make(self._tok, self._tokens, seed=self._seed)


def _http_latencies(url: str, model: str, prompts: Prompts, n: int, max_tokens: int, warmup: int = 2,
                    timeout_s: float = 120) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=timeout_s) as http:
        for i in range(n + warmup):
            body = {"model": model, "prompt": prompts.next(), "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            start = time.perf_counter()
            response = http.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == max_tokens
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return out


def _request(model: str, prompt, max_tokens: int, kv=None):
    from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest

    return CompletionRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                             kv_transfer_params=kv)


def _handle_paths(spec, prompts: Prompts, n: int, max_tokens: int) -> dict:
    from ray import serve
    from ray.llm._internal.serve.engines.vllm.kv_transfer.base import base_prefill_kv_transfer_params

    group = spec.deployment_groups[0].name
    prefill = serve.get_deployment_handle(f"{spec.name}:{group}:prefill", group_app_name(spec.name, group))
    decode = serve.get_deployment_handle(f"{spec.name}:{group}:decode", group_app_name(spec.name, group))
    model = spec.model.id
    res = {"handle_pd": [], "single_engine": [], "phase_prefill_rpc": [], "phase_pull_and_first_token": []}
    for i in range(n + 2):
        start = time.perf_counter()
        list(decode.options(stream=True).completions.remote(_request(model, prompts.next(), max_tokens)))
        t_pd = time.perf_counter() - start
        start = time.perf_counter()
        decode.local_completions.remote(_request(model, prompts.next(), max_tokens)).result()
        t_single = time.perf_counter() - start
        # Phases of one P/D request, driven by hand exactly as the decode orchestrator does it.
        prompt = prompts.next()
        start = time.perf_counter()
        first = None
        for chunk in prefill.options(stream=True).completions.remote(
                _request(model, prompt, 1, base_prefill_kv_transfer_params())):
            first = first or chunk
        t_prefill = time.perf_counter() - start
        start = time.perf_counter()
        decode.local_completions.remote(_request(model, prompt, 1, first.kv_transfer_params)).result()
        t_pull = time.perf_counter() - start
        if i >= 2:
            res["handle_pd"].append(t_pd)
            res["single_engine"].append(t_single)
            res["phase_prefill_rpc"].append(t_prefill)
            res["phase_pull_and_first_token"].append(t_pull)
    engine = {role: serve.get_deployment_handle(f"{spec.name}:{group}:{role}", group_app_name(spec.name, group))
              .engine_stats.remote(window_s=600).result() for role in ("prefill", "decode")}
    out = {k: _summary(v) for k, v in res.items()}
    out["engine_prefill_ttft_p50_ms"] = round(engine["prefill"]["ttft_p50_s"] * 1000, 2)
    out["engine_decode_tbt_p50_ms"] = round(engine["decode"]["tbt_p50_s"] * 1000, 2)
    return out


def _deploy_ours(spec, address) -> str:
    return svc.deploy(spec, address, timeout_s=900, progress=lambda m: print(m, file=sys.stderr))


def _deploy_ray_anchor(spec, address) -> str:
    """Ray Serve LLM's own P/D app on the same LLMConfigs (same pinning, engine kwargs, env)."""
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    svc.import_serving_app()
    from serving.app import llm_config_for
    from placement.ray_adapter import live_nodes
    from serving.deployment_groups import plan_group

    path = svc.model_path(spec)
    prefill_plan, decode_plan = plan_group(spec, spec.deployment_groups[0], 0, live_nodes(), path)
    app = build_pd_openai_app({
        "prefill_config": llm_config_for(spec, prefill_plan, path),
        "decode_config": llm_config_for(spec, decode_plan, path),
        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
    })
    serve.run(app, name="ray-pd", route_prefix="/", blocking=False)
    svc.wait_running("ray-pd", timeout_s=900, progress=lambda m: print(m, file=sys.stderr))
    return f"http://{spec.ingress.host}:{spec.ingress.port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--fix-off-requests", type=int, default=3, help="requests with the CPU fixes off (slow)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "router_overhead.json"))
    args = parser.parse_args()
    if min(args.requests, args.prompt_tokens, args.max_tokens) < 1:
        parser.error("--requests, --prompt-tokens and --max-tokens must be >= 1")

    cluster_data = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    cluster_data["head"].update(gcs_port=6395, dashboard_port=8278)
    service_data = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())
    service_data["ingress"].update(port=PORT)
    spec = parse_service_spec(service_data)
    from ray import serve

    started = time.time()
    state = local_cluster.up(parse_cluster_spec(cluster_data), temp_dir=TEMP_DIR,
                             progress=lambda m: print(m, file=sys.stderr))
    results: dict = {"config": {"requests": args.requests, "prompt_tokens": args.prompt_tokens,
                                "max_tokens": args.max_tokens, "model": "tiny-llama (generated)",
                                "machine": "2 cores, engines pinned one core each"}}
    try:
        prompts = Prompts(svc.model_path(spec), args.prompt_tokens)
        url = _deploy_ours(spec, state.address)
        print(f"measuring our path ({args.requests} requests each)", file=sys.stderr)
        results["router_http_pd"] = _summary(_http_latencies(url, spec.model.id, prompts, args.requests,
                                                             args.max_tokens))
        results.update(_handle_paths(spec, prompts, args.requests, args.max_tokens))
        svc.undeploy(spec.name)

        print("measuring Ray Serve LLM build_pd_openai_app (anchor)", file=sys.stderr)
        url = _deploy_ray_anchor(spec, state.address)
        results["ray_pd_http"] = _summary(_http_latencies(url, spec.model.id, prompts, args.requests,
                                                          args.max_tokens))
        serve.delete("ray-pd")

        if args.fix_off_requests > 0:
            print("measuring our path with the CPU fixes off (before)", file=sys.stderr)
            off = parse_service_spec({**service_data, "engine": {**service_data["engine"],
                                                                 "env": {"HETEROSCALE_CPU_FIXES": "0"}}})
            url = _deploy_ours(off, state.address)
            results["nixl_fix_off_http_pd"] = _summary(_http_latencies(
                url, spec.model.id, prompts, args.fix_off_requests, args.max_tokens, warmup=1, timeout_s=300))
            svc.undeploy(off.name)
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR, progress=lambda m: print(m, file=sys.stderr))

    router, handle, single = results["router_http_pd"], results["handle_pd"], results["single_engine"]
    results["router_added_ms_p50"] = round(router["p50_ms"] - handle["p50_ms"], 2)
    results["router_vs_handle_ratio_p50"] = round(router["p50_ms"] / handle["p50_ms"], 3)
    results["router_vs_ray_pd_ratio_p50"] = round(router["p50_ms"] / results["ray_pd_http"]["p50_ms"], 3)
    results["pd_added_ms_p50"] = round(handle["p50_ms"] - single["p50_ms"], 2)
    results["pd_vs_single_ratio_p50"] = round(handle["p50_ms"] / single["p50_ms"], 3)
    if "nixl_fix_off_http_pd" in results:
        results["fix_off_vs_on_ratio_p50"] = round(results["nixl_fix_off_http_pd"]["p50_ms"] / router["p50_ms"], 3)
    results["wall_s"] = round(time.time() - started, 1)
    write_result("router_overhead", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
