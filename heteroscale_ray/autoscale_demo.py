"""`heteroscale demo` (`make demo`): the coordinated autoscaler on the local labelled cluster, end to end.

Starts the cluster (unless one runs), deploys the service with its controller, replays an open-loop load in
three phases (light, heavy, light) that makes the controller scale decode and prefill out together, open a
second deployment group (DG) in another S1 domain once the first is full, then withdraw, observe and
terminate; writes `runs/demo-<UTC>/` (timeline.png, decisions.jsonl, requests.jsonl, summary.json), prints a
short summary and tears down what it started. Real vLLM engines, real NIXL; nothing is stubbed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from common.config import ClusterSpec, ServiceSpec, check_service_fits_cluster
from heteroscale_ray import local_cluster, service as svc

#: (duration_s, requests/s) per phase. With the example service's target of 100 decode tokens/s per decode
#: replica and 96-token outputs: ~0.5 replicas, then ~2 (the max), then ~0.3.
PHASES = ((45.0, 0.5), (200.0, 2.2), (190.0, 0.3))
INPUT_TOKENS, OUTPUT_TOKENS = 200, 96
SEED = 7


def demo_trace(phases: Sequence[tuple[float, float]] = PHASES, seed: int = SEED):
    """Poisson arrivals, piecewise constant rate; fixed request sizes."""
    from bench.load.traces import TraceRequest

    rng, rows, start = random.Random(seed), [], 0.0
    for duration, rate in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            rows.append(TraceRequest(int(t * 1000), INPUT_TOKENS, OUTPUT_TOKENS))
        start += duration
    return rows


def _replay(url: str, service: ServiceSpec, trace, out: Path, progress, started: list) -> list:
    from transformers import AutoTokenizer

    from bench.load import loadgen
    from heteroscale_ray.tiny_model import make_prompt

    a = service.autoscaling
    cfg = loadgen.LoadConfig(url=url, model=service.model.id, api_key=service.api_key(),
                             request_timeout_s=service.ingress.request_timeout_s, drain_timeout_s=120.0,
                             ttft_slo_ms=1000 * (a.ttft_slo_s or 2.0), tbt_slo_ms=1000 * (a.tbt_slo_s or 0.2))
    planned = loadgen.plan(cfg, trace)
    tokenizer = AutoTokenizer.from_pretrained(svc.model_path(service))
    prompts = loadgen.build_prompts([req for req, _ in planned], tokenizer, make_prompt)
    progress(f"replaying {len(planned)} requests over {planned[-1][1].scheduled_s:.0f}s "
             f"({', '.join(f'{d:.0f}s at {r:g} req/s' for d, r in PHASES)})")
    done = [0]
    asyncio.run(loadgen.replay(cfg, planned, prompts, on_done=lambda r: done.__setitem__(0, done[0] + 1),
                               on_start=lambda: started.append(time.time())))
    results = [res for _, res in planned]
    loadgen.write_results(out, cfg, results)
    return results


def _watch(service: ServiceSpec, stop: threading.Event, progress, interval_s: float = 10.0) -> None:
    """Print the controller's targets and groups every `interval_s` while the load runs."""
    from autoscaler import lifecycle

    import ray

    last = None
    while not stop.wait(interval_s):
        try:
            st = ray.get(lifecycle.find(service.name).status.remote(), timeout=20)
        except Exception as exc:  # report and keep watching: the controller may be restarting
            progress(f"  (controller status unavailable: {exc})")
            continue
        line = f"P={st['target_prefill']} D={st['target_decode']} " + " ".join(
            f"{g['name']}[{g['prefill']['ready']}/{g['decode']['ready']} ready"
            f"{', ' + str(g['prefill']['withdrawn'] + g['decode']['withdrawn']) + ' withdrawn' if g['prefill']['withdrawn'] + g['decode']['withdrawn'] else ''}]"
            for g in st["groups"])
        if line != last:
            d = st["last_decisions"][-1] if st["last_decisions"] else {}
            progress(f"  controller: {line}  (last: {d.get('action')}/{d.get('reason')})")
            last = line


def summarize(results, decisions: list[dict], ttft_slo_s: float, tbt_slo_s: float) -> dict:
    from bench.load.stats import summarize as load_summary
    from bench.sim.twin import instance_seconds

    load = load_summary(results, 1000 * ttft_slo_s, 1000 * tbt_slo_s)
    count = lambda action: sum(1 for d in decisions if d["action"] == action and not d["advisory"])  # noqa: E731
    sent = sum(1 for r in results if r.status != "not_sent")
    failed = sum(1 for r in results if r.status not in ("ok", "not_sent"))
    max_groups = max((len(d.get("groups", [])) for d in decisions), default=0)
    return {
        "slo_attainment_ttft": load["slo"]["attainment_ttft"], "slo_attainment_tbt": load["slo"]["attainment_tbt"],
        "instance_seconds": instance_seconds(decisions),
        "num_scale_out": count("scale_out"), "num_scale_in": count("scale_in"), "num_restore": count("restore"),
        "num_terminate": count("terminate_withdrawn"), "max_deployment_groups": max_groups,
        "requests_sent": sent, "failed_requests": failed, "load": load,
    }


def plot_timeline(results, decisions: list[dict], path: Path, ttft_slo_s: float, tbt_slo_s: float,
                  load_start_s: float) -> None:
    """Four panels against seconds since the load started: load, decode TPS vs target, replicas per DG and
    role (and the targets), TTFT/TBT p90 over their SLOs; vertical lines mark decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [d["t"] - load_start_s for d in decisions]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    sent = sorted(r.scheduled_s for r in results if r.status != "not_sent")
    bins = list(range(int(min(ts or [0])) // 10 * 10, int(max(ts or [0]) + 10), 10))
    axes[0].hist(sent, bins=bins, weights=[0.1] * len(sent), color="tab:gray")
    axes[0].set_ylabel("load (req/s)")
    tps = [d["observation"]["decode_tps"] for d in decisions]
    target = [d["target_decode"] * d.get("target_decode_tps_per_instance", 0) for d in decisions]
    axes[1].plot(ts, [v if v is not None else float("nan") for v in tps], label="decode tokens/s (observed)")
    axes[1].step(ts, target, where="post", label="target (D x per-instance target)", linestyle="--")
    axes[1].set_ylabel("decode tokens/s")
    names = sorted({g["name"] for d in decisions for g in d.get("groups", [])})
    for name in names:
        for role, style in (("prefill", ":"), ("decode", "-")):
            series = [next((g[role]["ready"] for g in d.get("groups", []) if g["name"] == name), 0) for d in decisions]
            axes[2].step(ts, series, where="post", linestyle=style, label=f"{name} {role} ready")
    axes[2].step(ts, [d["target_prefill"] for d in decisions], where="post", color="k", alpha=0.3, label="target P")
    axes[2].step(ts, [d["target_decode"] for d in decisions], where="post", color="k", alpha=0.6, label="target D")
    axes[2].set_ylabel("replicas")
    ttft = [d["observation"]["ttft_s"] for d in decisions]
    tbt = [d["observation"]["tbt_s"] for d in decisions]
    axes[3].plot(ts, [v / ttft_slo_s if v is not None else float("nan") for v in ttft], label="TTFT p90 / SLO")
    axes[3].plot(ts, [v / tbt_slo_s if v is not None else float("nan") for v in tbt], label="TBT p90 / SLO")
    axes[3].axhline(1.0, color="r", linewidth=0.8)
    axes[3].set_ylabel("latency / SLO")
    axes[3].set_xlabel("seconds since the load started")
    colors = {"scale_out": "green", "scale_in": "orange", "terminate_withdrawn": "red", "restore": "blue"}
    for d, t in zip(decisions, ts):
        if d["action"] in colors:
            for ax in axes:
                ax.axvline(t, color=colors[d["action"]], alpha=0.5, linewidth=1)
    axes[0].set_title("decision markers: green scale-out, orange withdraw, red terminate, blue restore")
    for ax in axes[1:]:
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cluster: ClusterSpec, service: ServiceSpec, address: str | None, progress: Callable[[str], None] = print,
        runs_dir: str | Path = "runs") -> int:
    import ray

    from autoscaler import lifecycle

    if service.autoscaling is None or not service.autoscaling.enabled:
        raise ValueError(f"service {service.name!r} has no enabled `autoscaling` section; the autoscaling demo "
                         "needs one (or run `heteroscale demo --quick`)")
    out = Path(runs_dir) / f"demo-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    started_here = False
    if address is None:
        check_service_fits_cluster(service, cluster)
        started_here = not local_cluster.is_running()
        address = local_cluster.up(cluster, progress=progress).address
    try:
        url = svc.deploy(service, address, progress=progress)
        handle = lifecycle.find(service.name)
        first_tick = ray.get(handle.ping.remote())["ticks"]
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(service, stop, progress), daemon=True)
        watcher.start()
        load_start = time.time()
        try:
            results = _replay(url, service, demo_trace(), out, progress, started := [])
        finally:
            stop.set()
        decisions = ray.get(handle.decision_log.remote(first_tick), timeout=30)
        with open(out / "decisions.jsonl", "w") as f:
            for d in decisions:
                f.write(json.dumps(d) + "\n")
        a = service.autoscaling
        summary = summarize(results, decisions, a.ttft_slo_s or 2.0, a.tbt_slo_s or 0.2)
        # what a replay of this run needs (bench/scripts/sim_vs_live.py): when the requests' clock began on
        # the decisions' clock, the controller's period and the load's shape
        summary["replay"] = {"service": service.name, "load_start_unix": round(started[0], 3),
                             "control_period_s": a.control_period_s, "phases": [list(p) for p in PHASES],
                             "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS, "seed": SEED}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_timeline(results, decisions, out / "timeline.png", a.ttft_slo_s or 2.0, a.tbt_slo_s or 0.2, load_start)
        progress(f"results in {out}/ (timeline.png, decisions.jsonl, requests.jsonl, summary.json)")
        progress(f"  requests sent {summary['requests_sent']}, failed {summary['failed_requests']}; SLO attainment "
                 f"TTFT {summary['slo_attainment_ttft']:.3f}, TBT {summary['slo_attainment_tbt']:.3f}")
        progress(f"  scale-outs {summary['num_scale_out']}, scale-ins {summary['num_scale_in']}, terminations "
                 f"{summary['num_terminate']}, restores {summary['num_restore']}; up to "
                 f"{summary['max_deployment_groups']} deployment groups")
        progress(f"  instance-seconds: prefill {summary['instance_seconds']['prefill']:.0f}, decode "
                 f"{summary['instance_seconds']['decode']:.0f}")
        svc.undeploy(service.name, address)
        return 0 if summary["failed_requests"] == 0 else 1
    finally:
        svc.disconnect()
        if started_here:
            local_cluster.down(progress=progress)
