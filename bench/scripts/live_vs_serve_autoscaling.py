"""Live head-to-head on the local labelled cluster: the demo's load shape (light -> heavy -> light) against the
same P/D service scaled three ways, in one run:

- `serve_default`: Ray Serve's own per-deployment autoscaling (ongoing-requests policy, its defaults:
  target_ongoing_requests 2, upscale 30 s / downscale 600 s delays), prefill and decode scaled apart;
- `serve_tuned`: the same policy tuned for this load (target_ongoing_requests 1, 5 s up / 30 s down);
- `heteroscale`: our controller.

Every variant gets one deployment group over the whole S2 (`affinity: s2`, so each pool can reach 2 replicas
without a second DG, which Serve's autoscaling cannot open), bounds 1..2 per pool, the same requests (same
seed), the same SLOs. A poller reads Serve's replica states every second for all variants alike:
instance-seconds per role (replicas holding resources), scale events (target changes), and the load
generator gives SLO attainment and failed requests. Writes bench/results/live_vs_serve_autoscaling.json.

    .venv/bin/python bench/scripts/live_vs_serve_autoscaling.py      # ~25 min
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.load import loadgen  # noqa: E402
from bench.load.stats import summarize  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from common.config import parse_cluster_spec, parse_service_spec  # noqa: E402
from autoscaler.serve_client import role_states  # noqa: E402
from common.vocab import Role, group_app_name  # noqa: E402
from heteroscale_ray import autoscale_demo, local_cluster  # noqa: E402
from heteroscale_ray import service as svc  # noqa: E402

TEMP_DIR = "/tmp/hsray-bench-h2h"
PORT = 8019
PHASES = ((30.0, 0.5), (150.0, 2.2), (120.0, 0.3))
SERVE_DEFAULT = {"min_replicas": 1, "max_replicas": 2}  # Serve's defaults otherwise (ray.llm: target 2 ongoing)
SERVE_TUNED = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 5,
               "downscale_delay_s": 30}


def spec_for(variant: str):
    data = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())
    data["name"] = f"h2h-{variant.replace('_', '-')}"
    data["affinity"] = "s2"
    data["deployment_groups"] = [{"name": "dg", "domain": "s2-0", "prefill_replicas": 1, "decode_replicas": 1}]
    data["ingress"].update(port=PORT, api_key=None, api_key_env=None)
    if variant != "heteroscale":
        data.pop("autoscaling")
    return parse_service_spec(data)


def deploy_serve_autoscaled(spec, autoscaling: dict, address: str) -> str:
    from ray import serve

    from placement.ray_adapter import live_nodes

    svc.connect(address)
    app = svc.import_serving_app()
    built = app.build_group_app(spec, spec.deployment_groups[0], 0, svc.model_path(spec), live_nodes(),
                                serve_autoscaling=autoscaling)
    serve.start(http_options={"host": spec.ingress.host, "port": spec.ingress.port}, proxy_location="HeadOnly")
    app.run_group_app(spec, built)
    serve.run(app.build_ingress_app(spec, [built]), name=spec.name, route_prefix="/", blocking=False)
    for name in (built.app_name, spec.name):
        svc.wait_running(name, timeout_s=600, progress=lambda m: print(m, file=sys.stderr))
    return f"http://{spec.ingress.host}:{spec.ingress.port}"


class Poller(threading.Thread):
    """Replica states of the variant's DG applications every `period_s` (the same meter for every variant)."""

    def __init__(self, spec, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.spec, self.period_s, self.stop = spec, period_s, threading.Event()
        self.rows: list[tuple[float, dict, dict]] = []  # (t, holding per role, target per role)

    def run(self) -> None:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        while not self.stop.wait(self.period_s):
            details = client.get_serve_details()
            holding, target = {r.value: 0 for r in Role}, {r.value: 0 for r in Role}
            prefix = group_app_name(self.spec.name, "")
            for app_name in details.get("applications") or {}:
                states = role_states(details, self.spec.name, app_name[len(prefix):]) \
                    if app_name.startswith(prefix) else None
                for role, st in (states or {}).items():  # the controller's own reading of Serve's details
                    holding[role.value] += st.holding
                    target[role.value] += st.target
            self.rows.append((time.time(), holding, target))


def run_variant(variant: str, address: str) -> dict:
    spec = spec_for(variant)
    print(f"=== {variant}", file=sys.stderr)
    if variant == "heteroscale":
        url = svc.deploy(spec, address, timeout_s=600, progress=lambda m: print(m, file=sys.stderr))
    else:
        url = deploy_serve_autoscaled(spec, SERVE_DEFAULT if variant == "serve_default" else SERVE_TUNED, address)
    poller = Poller(spec)
    poller.start()
    try:
        trace = autoscale_demo.demo_trace(PHASES)
        a = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())["autoscaling"]
        cfg = loadgen.LoadConfig(url=url, model=spec.model.id, request_timeout_s=120, drain_timeout_s=120,
                                 ttft_slo_ms=1000 * a["ttft_slo_s"], tbt_slo_ms=1000 * a["tbt_slo_s"])
        from transformers import AutoTokenizer

        from heteroscale_ray.tiny_model import make_prompt

        planned = loadgen.plan(cfg, trace)
        prompts = loadgen.build_prompts([r for r, _ in planned], AutoTokenizer.from_pretrained(svc.model_path(spec)),
                                        make_prompt)
        asyncio.run(loadgen.replay(cfg, planned, prompts))
    finally:
        poller.stop.set()
        poller.join(timeout=10)
    results = [res for _, res in planned]
    load = summarize(results, cfg.ttft_slo_ms, cfg.tbt_slo_ms)
    instance_s = {r.value: 0.0 for r in Role}
    events = 0
    for (t0, held, target), (t1, _, next_target) in zip(poller.rows, poller.rows[1:]):
        for role in instance_s:
            instance_s[role] += held[role] * (t1 - t0)
        events += sum(1 for role in instance_s if next_target[role] != target[role])
    svc.undeploy(spec.name, address)
    return {"slo_attainment_ttft": load["slo"]["attainment_ttft"], "slo_attainment_tbt": load["slo"]["attainment_tbt"],
            "instance_seconds": {k: round(v, 1) for k, v in instance_s.items()},
            "instance_seconds_total": round(sum(instance_s.values()), 1), "scale_events": events,
            "failed_requests": sum(1 for r in results if r.status not in ("ok", "not_sent")),
            "requests": len(results), "ttft_p90_ms": load["ttft"]["p90_ms"], "tbt_p90_ms": load["tbt"]["p90_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="serve_default,serve_tuned,heteroscale")
    args = parser.parse_args()
    data = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    data["head"].update(gcs_port=6399, dashboard_port=8283)
    state = local_cluster.up(parse_cluster_spec(data), temp_dir=TEMP_DIR)
    try:
        out = {v: run_variant(v, state.address) for v in args.variants.split(",")}
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)
    ours = out.get("heteroscale")
    ratios = {}
    if ours:
        for name, res in out.items():
            if name != "heteroscale" and res["instance_seconds_total"]:
                ratios[f"heteroscale_instance_seconds_vs_{name}"] = round(
                    ours["instance_seconds_total"] / res["instance_seconds_total"], 3)
    write_result("live_vs_serve_autoscaling", {"benchmark": "live_vs_serve_autoscaling", "phases": PHASES,
                                               "variants": out, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
