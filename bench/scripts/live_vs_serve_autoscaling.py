"""Live head-to-head on the local labelled cluster: the same P/D service under the same load, scaled three ways,
in one run:

- `heteroscale`: our controller on the targets it curated itself: a short `heteroscale profile` through the
  deployed 1P+1D group first (as `make demo` does), then the active controller on the profile's decode target,
  P:D ratio and prefill target (the adaptive ratio);
- `serve_tuned`: Ray Serve's own per-deployment autoscaling with a target per role from the same profile: the
  requests each role held in flight per replica at the profile's operating points (Little's law), times the
  same headroom; 5 s upscale / 30 s downscale delays;
- `serve_default`: the same policy as `ray.llm` configures it by default (2 ongoing requests per replica for
  both roles, Serve's default delays).

Load (in units of one decode replica's curated target, as the demo's): light, prompt-heavy at the same request
rate (prompts x5: the ratio the workload needs moves), light, a ramp to 1.4 decode replicas' worth, light.
Every variant gets one deployment group over the whole S2 (`affinity: s2`, so each pool can reach 2 replicas
without a second DG, which Serve's autoscaling cannot open), bounds 1..2 per pool, the same requests (same seed),
the same SLOs. A poller reads Serve's replica states every second for all variants alike: instance-seconds per
role (replicas holding resources), scale events per role (target changes), each phase's mean replicas per role,
and ratio violations: seconds the group held a prefill count outside the band of the ratio the phase's mix needs
at the curated capacities (`ceil((D-1) r) <= P <= ceil(D r)`, clipped to the bounds). The load generator gives
SLO attainment and failed requests. Writes bench/results/live_vs_serve_autoscaling.json (and the profile beside
it in bench/results/live_vs_serve_autoscaling/).

On 2 shared cores more replicas add no compute: read it for behaviour (which pool each policy scales, and when),
not for economics (the simulator measures those).

    .venv/bin/python bench/scripts/live_vs_serve_autoscaling.py      # ~35 min
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import threading
import time
from dataclasses import replace
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
from heteroscale_ray.autoscale_demo import INPUT_TOKENS, OUTPUT_TOKENS, Phase  # noqa: E402

TEMP_DIR = "/tmp/hsray-bench-h2h"
PORT = 8019
PHASES = (Phase("light", 30, 0.5), Phase("prompt-heavy", 90, 0.5, 5.0), Phase("light", 30, 0.5),
          Phase("ramp", 150, 1.4), Phase("light", 120, 0.3))
LOAD_S = sum(p.duration_s for p in PHASES)
BOUNDS = {"min_replicas": 1, "max_replicas": 2}
SERVE_DEFAULT = {"target_ongoing_requests": 2.0}  # ray.llm's default; Serve's default delays
SERVE_TUNED_DELAYS = {"upscale_delay_s": 5, "downscale_delay_s": 30}
VARIANTS = ("heteroscale", "serve_tuned", "serve_default")
log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731


def spec_for(variant: str):
    data = yaml.safe_load((ROOT / "examples" / "service-local.yaml").read_text())
    data["name"] = f"h2h-{variant.replace('_', '-')}"
    data["affinity"] = "s2"
    data["deployment_groups"] = [{"name": "dg", "domain": "s2-0", "prefill_replicas": 1, "decode_replicas": 1}]
    data["ingress"].update(port=PORT, api_key=None, api_key_env=None)
    if variant != "heteroscale":
        data.pop("autoscaling")
    return parse_service_spec(data)


def serve_configs(variant: str, profile_result: dict) -> dict[Role, dict]:
    """Each role's `autoscaling_config` for a Serve variant."""
    if variant == "serve_default":
        return {role: {**BOUNDS, **SERVE_DEFAULT} for role in Role}
    targets = profile_result["serve_target_ongoing_requests"]
    missing = [role for role, t in targets.items() if not t]
    if missing:
        raise ValueError(f"the profile measured no requests in flight for {missing}: no Serve target to tune from")
    return {role: {**BOUNDS, **SERVE_TUNED_DELAYS, "target_ongoing_requests": targets[role.value]} for role in Role}


def deploy_serve_autoscaled(spec, autoscaling: dict[Role, dict], address: str) -> str:
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
        svc.wait_running(name, timeout_s=600, progress=log)
    return f"http://{spec.ingress.host}:{spec.ingress.port}"


def deploy_ours_curated(address: str, out: Path) -> tuple[object, str, dict]:
    """Deploy with the controller advisory, profile the 1P+1D group, then start the active controller on the
    curated targets (the forecast has no earlier period in this run, so it stays reactive)."""
    from autoscaler import lifecycle

    spec = spec_for("heteroscale")
    advisory = replace(spec, autoscaling=spec.autoscaling.model_copy(update={"advisory": True}))
    url, groups = svc.deploy_apps(advisory, address, progress=log)
    svc.start_controller(advisory, groups, progress=log)
    out.mkdir(parents=True, exist_ok=True)
    profile_result = autoscale_demo.curate(url, spec, out, log)
    lifecycle.stop(spec.name)
    spec = autoscale_demo.curated(spec, profile_result, period_s=LOAD_S)
    svc.start_controller(spec, groups, progress=log)
    return spec, url, profile_result


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


def needed_ratio(phase: Phase, curated: dict) -> float:
    """Prefill replicas per decode replica that the phase's mix needs at the curated per-replica capacities."""
    prefill = INPUT_TOKENS * phase.prompt_scale / curated["target_prefill_tps_per_instance"]
    return prefill / (OUTPUT_TOKENS / curated["target_decode_tps_per_instance"])


def in_band(prefill: int, decode: int, ratio: float) -> bool:
    lo = min(math.ceil((decode - 1) * ratio), BOUNDS["max_replicas"])
    hi = max(math.ceil(decode * ratio), BOUNDS["min_replicas"])
    return lo <= prefill <= hi


def behaviour(rows, load_start: float, curated: dict) -> dict:
    """Instance-seconds, scale events per role, each phase's mean replicas per role and ratio violations."""
    instance_s = {r.value: 0.0 for r in Role}
    events = {r.value: 0 for r in Role}
    per_phase = [{"phase": p.name, "needed_prefill_per_decode": round(needed_ratio(p, curated), 2),
                  "seconds": 0.0, "prefill": 0.0, "decode": 0.0, "ratio_violation_s": 0.0} for p in PHASES]
    ends = [sum(p.duration_s for p in PHASES[:i + 1]) for i in range(len(PHASES))]
    for (t0, held, target), (t1, _, next_target) in zip(rows, rows[1:]):
        dt = t1 - t0
        for role in instance_s:
            instance_s[role] += held[role] * dt
            events[role] += next_target[role] != target[role]
        since = t0 - load_start
        i = next((k for k, end in enumerate(ends) if 0 <= since < end), None)
        if i is None:
            continue
        ph = per_phase[i]
        ph["seconds"] += dt
        ph["prefill"] += held["prefill"] * dt
        ph["decode"] += held["decode"] * dt
        if held["decode"] and not in_band(held["prefill"], held["decode"], needed_ratio(PHASES[i], curated)):
            ph["ratio_violation_s"] += dt
    for ph in per_phase:
        s = ph.pop("seconds")
        ph["prefill"], ph["decode"] = (round(ph[k] / s, 2) if s else None for k in ("prefill", "decode"))
        ph["ratio_violation_s"] = round(ph["ratio_violation_s"], 1)
    return {"instance_seconds": {k: round(v, 1) for k, v in instance_s.items()},
            "instance_seconds_total": round(sum(instance_s.values()), 1),
            "scale_events": events, "ratio_violation_s": round(sum(p["ratio_violation_s"] for p in per_phase), 1),
            "phases": per_phase}


def measure(spec, url: str, curated: dict, slos: tuple[float, float], address: str) -> dict:
    from transformers import AutoTokenizer

    from heteroscale_ray.tiny_model import make_prompt

    poller = Poller(spec)
    poller.start()
    try:
        trace = autoscale_demo.demo_trace(autoscale_demo.concrete_phases(curated["target_decode_tps_per_instance"],
                                                                         PHASES))
        cfg = loadgen.LoadConfig(url=url, model=spec.model.id, request_timeout_s=120, drain_timeout_s=120,
                                 ttft_slo_ms=1000 * slos[0], tbt_slo_ms=1000 * slos[1])
        planned = loadgen.plan(cfg, trace)
        prompts = loadgen.build_prompts([r for r, _ in planned], AutoTokenizer.from_pretrained(svc.model_path(spec)),
                                        make_prompt)
        log(f"load: {', '.join(f'{p.name} {p.duration_s:g}s' for p in PHASES)} ({len(planned)} requests)")
        load_start = time.time()
        asyncio.run(loadgen.replay(cfg, planned, prompts))
    finally:
        poller.stop.set()
        poller.join(timeout=10)
    results = [res for _, res in planned]
    load = summarize(results, cfg.ttft_slo_ms, cfg.tbt_slo_ms)
    svc.undeploy(spec.name, address)
    return {"slo_attainment_ttft": load["slo"]["attainment_ttft"], "slo_attainment_tbt": load["slo"]["attainment_tbt"],
            **behaviour(poller.rows, load_start, curated),
            "failed_requests": sum(1 for r in results if r.status not in ("ok", "not_sent")),
            "requests": len(results), "ttft_p90_ms": load["ttft"]["p90_ms"], "tbt_p90_ms": load["tbt"]["p90_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="which to run besides the profile (heteroscale's deploy always profiles first)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    data = yaml.safe_load((ROOT / "examples" / "cluster-local.yaml").read_text())
    data["head"].update(gcs_port=6399, dashboard_port=8283)
    state = local_cluster.up(parse_cluster_spec(data), temp_dir=TEMP_DIR)
    out: dict[str, dict] = {}
    try:
        spec, url, profile_result = deploy_ours_curated(state.address, ROOT / "bench" / "results" /
                                                        "live_vs_serve_autoscaling")
        curated = profile_result["autoscaling"]
        slos = (curated["ttft_slo_s"], curated["tbt_slo_s"])
        if "heteroscale" in variants:
            log("=== heteroscale")
            out["heteroscale"] = measure(spec, url, curated, slos, state.address)
        else:
            svc.undeploy(spec.name, state.address)
        for variant in (v for v in VARIANTS if v != "heteroscale" and v in variants):
            log(f"=== {variant}")
            serve_spec = spec_for(variant)
            configs = serve_configs(variant, profile_result)
            out[variant] = {"autoscaling_config": {r.value: c for r, c in configs.items()},
                            **measure(serve_spec, deploy_serve_autoscaled(serve_spec, configs, state.address),
                                      curated, slos, state.address)}
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)
    ours = out.get("heteroscale")
    ratios = {f"heteroscale_instance_seconds_vs_{name}": round(ours["instance_seconds_total"] /
                                                               res["instance_seconds_total"], 3)
              for name, res in out.items() if ours and name != "heteroscale" and res["instance_seconds_total"]}
    write_result("live_vs_serve_autoscaling", {
        "benchmark": "live_vs_serve_autoscaling",
        "note": "2 shared cores: more replicas add no compute; read for behaviour, not economics",
        "phases": [[p.name, p.duration_s, p.decode_load, p.prompt_scale] for p in PHASES],
        "curated": curated, "serve_target_ongoing_requests": profile_result["serve_target_ongoing_requests"],
        "variants": out, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
