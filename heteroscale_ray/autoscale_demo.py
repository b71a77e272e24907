"""`heteroscale demo` (`make demo`): the coordinated autoscaler on the local labelled cluster, end to end.

Starts the cluster (unless one runs), deploys the service with its controller in advisory mode, curates the
controller's targets with a short `heteroscale profile` run on the deployed service (stepped rates through the
fixed 1P+1D group), restarts the controller with them (active), then replays an open-loop load whose phases
are set from the curated target: light; prompt-heavy at the same decode load (the adaptive ratio grows prefill
while decode holds); a decode ramp (both pools scale out together and a second deployment group opens in the
other S1 domain); light; the same ramp one forecast period later (the start-up-aware forecast has capacity
Ready before it); light (withdraw, observe, terminate). Writes `runs/demo-<UTC>/` (timeline.png,
decisions.jsonl, requests.jsonl, profile.json, profile.png, summary.json), prints a short summary and tears
down what it started. Real vLLM engines, real NIXL; nothing is stubbed.

The profile steps only up to the rates the demo then sends, so its capacities are lower bounds
(`*_limit_reached: false`) and the curated target is conservative: on 2 shared cores more replicas add no
compute, and the load must stay within what the machine serves for the run to show zero failures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from common.config import AutoscalingSpec, ClusterSpec, ServiceSpec, check_service_fits_cluster
from heteroscale_ray import local_cluster, service as svc

INPUT_TOKENS, OUTPUT_TOKENS = 200, 96
SEED = 7
PROFILE_RATES, PROFILE_STEP_S = (0.5, 1.0, 2.0), 15.0


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    decode_load: float  # decode tokens/s asked, as a share of one decode replica's curated target
    prompt_scale: float = 1.0  # prompt length x INPUT_TOKENS


#: One decode replica's target is 1.0: 0.5 holds one; 1.4 asks for two (the max: the second DG). The
#: prompt-heavy phase keeps the light phases' request rate and outputs, with prompts x5 (~2x one prefill
#: replica's prompt tokens/s). Replicas start in ~100-120 s on this machine: the first ramp lasts long enough for
#: its new group to serve, and the gap lets it be withdrawn and terminated before the forecast starts the
#: repeat's capacity one measured start-up ahead.
PHASES = (Phase("light", 30, 0.5), Phase("prompt-heavy", 105, 0.5, 5.0), Phase("light", 75, 0.5),
          Phase("ramp", 120, 1.4), Phase("light", 150, 0.5), Phase("ramp again", 105, 1.4), Phase("light", 30, 0.5))


RAMP = next(p for p in PHASES if p.name == "ramp")


def phase_starts(phases: Sequence[Phase] = PHASES) -> dict[str, float]:
    """Seconds from the load's start to each phase's start (by name; a repeated name keeps the first)."""
    out, t = {}, 0.0
    for p in phases:
        out.setdefault(p.name, t)
        t += p.duration_s
    return out


def forecast_period_s(phases: Sequence[Phase] = PHASES) -> float:
    """The demo's "day": the repeated ramp comes one forecast period after the first."""
    starts = phase_starts(phases)
    return starts["ramp again"] - starts["ramp"]


def concrete_phases(target_decode_tps: float, phases: Sequence[Phase] = PHASES) -> list[tuple[float, float, int]]:
    """(duration_s, requests/s, prompt tokens) per phase, for a decode replica's target of `target_decode_tps`."""
    if target_decode_tps <= 0:
        raise ValueError(f"target_decode_tps ({target_decode_tps}) must be > 0")
    return [(p.duration_s, round(p.decode_load * target_decode_tps / OUTPUT_TOKENS, 3),
             int(round(INPUT_TOKENS * p.prompt_scale))) for p in phases]


def demo_trace(phases: Sequence[tuple], seed: int = SEED):
    """Poisson arrivals, piecewise constant rate; (duration_s, requests/s[, prompt tokens]) per phase, fixed
    output length."""
    from bench.load.traces import TraceRequest

    rng, rows, start = random.Random(seed), [], 0.0
    for duration, rate, *prompt in phases:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            rows.append(TraceRequest(int(t * 1000), prompt[0] if prompt else INPUT_TOKENS, OUTPUT_TOKENS))
        start += duration
    return rows


def curated(service: ServiceSpec, profile_result: dict, period_s: float | None = None) -> ServiceSpec:
    """The service with the profile's autoscaling values (target, ratio, prefill target) and the demo's time
    scale: the adaptive ratio's window, and the forecast over the demo's period (`period_s`, default the
    phases')."""
    a = service.autoscaling
    fields = {**a.model_dump(), **{k: v for k, v in profile_result["autoscaling"].items()
                                   if k in ("target_decode_tps_per_instance", "prefill_per_decode",
                                            "target_prefill_tps_per_instance")},
              "ratio_window_s": 20.0, "forecast_period_s": period_s or forecast_period_s(), "forecast_bin_s": 10.0,
              "advisory": False}
    return replace(service, autoscaling=AutoscalingSpec.model_validate(fields))


def _replay(url: str, service: ServiceSpec, trace, out: Path, progress, started: list, described: str) -> list:
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
    progress(f"replaying {len(planned)} requests over {planned[-1][1].scheduled_s:.0f}s ({described})")
    asyncio.run(loadgen.replay(cfg, planned, prompts, on_start=lambda: started.append(time.time())))
    results = [res for _, res in planned]
    loadgen.write_results(out, cfg, results)
    return results


def _watch(service: ServiceSpec, stop: threading.Event, progress, interval_s: float = 10.0) -> None:
    """Print the controller's targets, ratio and groups every `interval_s` while the load runs."""
    from autoscaler import lifecycle

    import ray

    last = None
    while not stop.wait(interval_s):
        try:
            st = ray.get(lifecycle.find(service.name).status.remote(), timeout=20)
        except Exception as exc:  # report and keep watching: the controller may be restarting
            progress(f"  (controller status unavailable: {exc})")
            continue
        def group_text(g: dict) -> str:
            withdrawn = g["prefill"]["withdrawn"] + g["decode"]["withdrawn"]
            return (f"{g['name']}[{g['prefill']['ready']}P/{g['decode']['ready']}D ready"
                    f"{f', {withdrawn} withdrawn' if withdrawn else ''}]")

        line = f"P={st['target_prefill']} D={st['target_decode']} " + " ".join(map(group_text, st["groups"]))
        if line != last:
            d = st["last_decisions"][-1] if st["last_decisions"] else {}
            forecast = (st.get("forecast") or {}).get("decode_tps")
            progress(f"  controller: {line}  P:D {st.get('prefill_per_decode') or 0:.2f}"
                     f"{f', forecast {forecast:.0f} tok/s' if forecast else ''}"
                     f"  (last: {d.get('action')}/{d.get('reason')})")
            last = line


def summarize(results, decisions: list[dict], ttft_slo_s: float, tbt_slo_s: float) -> dict:
    """summary.json: SLO attainment, instance-seconds, actions by kind, the P:D ratio the controller used
    (min, max) and `num_prewarm` (scale-outs and restores the forecast decided before the load asked: the
    policy gives reason `forecast` only where the forecast asks for more decode replicas than the observed
    load does)."""
    from bench.load.stats import summarize as load_summary
    from bench.sim.twin import instance_seconds

    load = load_summary(results, 1000 * ttft_slo_s, 1000 * tbt_slo_s)
    acted = [d for d in decisions if not d["advisory"]]
    count = lambda action: sum(1 for d in acted if d["action"] == action)  # noqa: E731
    sent = sum(1 for r in results if r.status != "not_sent")
    failed = sum(1 for r in results if r.status not in ("ok", "not_sent"))
    max_groups = max((len(d.get("groups", [])) for d in decisions), default=0)
    ratios = [d["diagnostics"]["prefill_per_decode"] for d in decisions
              if d.get("diagnostics", {}).get("prefill_per_decode") is not None]
    return {
        "slo_attainment_ttft": load["slo"]["attainment_ttft"], "slo_attainment_tbt": load["slo"]["attainment_tbt"],
        "instance_seconds": instance_seconds(decisions),
        "num_scale_out": count("scale_out"), "num_scale_in": count("scale_in"), "num_restore": count("restore"),
        "num_terminate": count("terminate_withdrawn"), "max_deployment_groups": max_groups,
        "prefill_per_decode_min": min(ratios) if ratios else None,
        "prefill_per_decode_max": max(ratios) if ratios else None,
        "num_prewarm": sum(1 for d in acted if d["reason"] == "forecast" and d["action"] in ("scale_out", "restore")),
        "num_forecast_holds": sum(1 for d in acted if d["reason"] == "forecast" and d["action"] == "hold"),
        "requests_sent": sent, "failed_requests": failed, "load": load,
    }


def ready_before(decisions: list[dict], t_unix: float) -> dict[str, int] | None:
    """Replicas Ready per role at the last decision before `t_unix` (None if none came before it)."""
    before = [d for d in decisions if d["t"] < t_unix]
    if not before:
        return None
    groups = before[-1].get("groups", [])
    return {role: sum(g[role]["ready"] for g in groups) for role in ("prefill", "decode")}


def plot_timeline(results, decisions: list[dict], path: Path, ttft_slo_s: float, tbt_slo_s: float,
                  load_start_s: float, phase_marks: dict[str, float] | None = None) -> None:
    """Five panels against seconds since the load started: load (requests/s and prompt tokens/s), decode
    tokens/s vs the target and the forecast, replicas per DG and role (and the targets), the P:D ratio in
    force and its estimate, TTFT/TBT p90 over their SLOs; vertical lines mark decisions, labels the phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    ts = [d["t"] - load_start_s for d in decisions]
    diag = [d.get("diagnostics", {}) for d in decisions]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    sent = sorted((r.scheduled_s, r.input_tokens) for r in results if r.status != "not_sent")
    bins = list(range(int(min(ts or [0])) // 10 * 10, int(max(ts or [0]) + 10), 10))
    axes[0].hist([s for s, _ in sent], bins=bins, weights=[0.1] * len(sent), color="tab:gray")
    axes[0].set_ylabel("load (req/s)")
    prompt_ax = axes[0].twinx()
    prompt_ax.hist([s for s, _ in sent], bins=bins, weights=[n / 10 for _, n in sent], histtype="step",
                   color="tab:purple")
    prompt_ax.set_ylabel("prompt tokens/s", color="tab:purple")
    tps = [d["observation"]["decode_tps"] for d in decisions]
    target = [d["target_decode"] * d.get("target_decode_tps_per_instance", 0) for d in decisions]
    axes[1].plot(ts, [v if v is not None else nan for v in tps], label="decode tokens/s (observed)")
    axes[1].step(ts, target, where="post", label="target (D x per-instance target)", linestyle="--")
    forecast = [x.get("forecast_decode_tps", nan) for x in diag]
    if any(v == v for v in forecast):
        axes[1].plot(ts, forecast, color="tab:red", alpha=0.7, label="forecast (peak within one start-up)")
    axes[1].set_ylabel("decode tokens/s")
    names = sorted({g["name"] for d in decisions for g in d.get("groups", [])})
    for name in names:
        for role, style in (("prefill", ":"), ("decode", "-")):
            series = [next((g[role]["ready"] for g in d.get("groups", []) if g["name"] == name), 0) for d in decisions]
            axes[2].step(ts, series, where="post", linestyle=style, label=f"{name} {role} ready")
    axes[2].step(ts, [d["target_prefill"] for d in decisions], where="post", color="k", alpha=0.3, label="target P")
    axes[2].step(ts, [d["target_decode"] for d in decisions], where="post", color="k", alpha=0.6, label="target D")
    axes[2].set_ylabel("replicas")
    axes[3].step(ts, [x.get("prefill_per_decode", nan) for x in diag], where="post", label="P:D in force")
    axes[3].plot(ts, [x.get("ratio_estimate", nan) for x in diag], alpha=0.7, label="P:D the signals ask for")
    axes[3].set_ylabel("prefill per decode")
    ttft = [d["observation"]["ttft_s"] for d in decisions]
    tbt = [d["observation"]["tbt_s"] for d in decisions]
    axes[4].plot(ts, [v / ttft_slo_s if v is not None else nan for v in ttft], label="TTFT p90 / SLO")
    axes[4].plot(ts, [v / tbt_slo_s if v is not None else nan for v in tbt], label="TBT p90 / SLO")
    axes[4].axhline(1.0, color="r", linewidth=0.8)
    axes[4].set_ylabel("latency / SLO")
    axes[4].set_xlabel("seconds since the load started")
    colors = {"scale_out": "green", "scale_in": "orange", "terminate_withdrawn": "red", "restore": "blue"}
    for d, t in zip(decisions, ts):
        if d["action"] in colors:
            for ax in axes:
                ax.axvline(t, color=colors[d["action"]], alpha=0.5, linewidth=1,
                           linestyle="--" if d["reason"] == "forecast" else "-")
    for name, t in (phase_marks or {}).items():
        axes[0].annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), fontsize="small", va="bottom")
    axes[0].set_title("decisions: green scale-out, orange withdraw, red terminate, blue restore (dashed: forecast)",
                      pad=14)
    for ax in axes[1:]:
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curate(url: str, service: ServiceSpec, out: Path, progress) -> dict:
    """`heteroscale profile`, short: the fixed 1P+1D group stepped through PROFILE_RATES (profile.json/png)."""
    from transformers import AutoTokenizer

    from bench.load import profile
    from heteroscale_ray.tiny_model import make_prompt

    a = service.autoscaling
    progress(f"curating the controller's targets: heteroscale profile at {', '.join(map(str, PROFILE_RATES))} "
             f"req/s, {PROFILE_STEP_S:g}s each, through the deployed 1P+1D group")
    result = profile.run(url, service.model.id, service.api_key(), PROFILE_RATES, PROFILE_STEP_S, INPUT_TOKENS,
                         OUTPUT_TOKENS, 1, 1, a.ttft_slo_s or 2.0, a.tbt_slo_s or 0.2,
                         AutoTokenizer.from_pretrained(svc.model_path(service)), make_prompt,
                         request_timeout_s=service.ingress.request_timeout_s, progress=progress)
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    profile.plot(result, out / "profile.png")
    c = result["autoscaling"]
    progress(f"  curated: target {c['target_decode_tps_per_instance']} decode tokens/s per decode replica, "
             f"{c['target_prefill_tps_per_instance']} prompt tokens/s per prefill replica, P:D "
             f"{c['prefill_per_decode']} (lower bounds: the steps stop at the demo's own rates)")
    return result


def run(cluster: ClusterSpec, service: ServiceSpec, address: str | None, progress: Callable[[str], None] = print,
        runs_dir: str | Path = "runs") -> int:
    import ray

    from autoscaler import lifecycle

    if service.autoscaling is None or not service.autoscaling.enabled:
        raise ValueError(f"service {service.name!r} has no enabled `autoscaling` section; the autoscaling demo "
                         "needs one (or run `heteroscale demo --quick`)")
    shape = [(g.name, g.num_prefill, g.num_decode) for g in service.deployment_groups]
    if len(shape) != 1 or shape[0][1:] != (1, 1):
        raise ValueError(f"service {service.name!r}: the demo profiles and starts from one 1P+1D deployment group, "
                         f"got {shape}")
    out = Path(runs_dir) / f"demo-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    started_here = False
    if address is None:
        check_service_fits_cluster(service, cluster)
        started_here = not local_cluster.is_running()
        address = local_cluster.up(cluster, progress=progress).address
    try:
        advisory = replace(service, autoscaling=service.autoscaling.model_copy(update={"advisory": True}))
        url, groups = svc.deploy_apps(advisory, address, progress=progress)
        svc.start_controller(advisory, groups, progress=progress)  # routes as the active one will; acts on nothing
        profile_result = curate(url, service, out, progress)
        lifecycle.stop(service.name)  # its state saw the profile's load: the active controller starts afresh
        service = curated(service, profile_result)
        svc.start_controller(service, groups, progress=progress)
        handle = lifecycle.find(service.name)
        first_tick = ray.get(handle.ping.remote())["ticks"]
        a = service.autoscaling
        phases = concrete_phases(a.target_decode_tps_per_instance)
        described = ", ".join(f"{p.name} {d:.0f}s at {r:g} req/s x {n} prompt tokens"
                              for p, (d, r, n) in zip(PHASES, phases))
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(service, stop, progress), daemon=True)
        watcher.start()
        try:
            results = _replay(url, service, demo_trace(phases), out, progress, started := [], described)
        finally:
            stop.set()
        decisions = ray.get(handle.decision_log.remote(first_tick), timeout=30)
        with open(out / "decisions.jsonl", "w") as f:
            for d in decisions:
                f.write(json.dumps(d) + "\n")
        summary = summarize(results, decisions, a.ttft_slo_s or 2.0, a.tbt_slo_s or 0.2)
        summary["curated"] = profile_result["autoscaling"]
        starts = phase_starts()
        summary["ready_before_repeat"] = ready_before(decisions, started[0] + starts["ramp again"])
        summary["decode_asked_by_first_ramp"] = max(
            (d["target_decode"] for d in decisions
             if started[0] + starts["ramp"] <= d["t"] < started[0] + starts["ramp"] + RAMP.duration_s),
            default=None)
        # what a replay of this run needs (bench/scripts/sim_vs_live.py): when the requests' clock began on
        # the decisions' clock, the controller's period and the load's shape
        summary["replay"] = {"service": service.name, "load_start_unix": round(started[0], 3),
                             "control_period_s": a.control_period_s,
                             "phases": [[p.name, d, r, n] for p, (d, r, n) in zip(PHASES, phases)],
                             "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS, "seed": SEED,
                             "forecast_period_s": a.forecast_period_s}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_timeline(results, decisions, out / "timeline.png", a.ttft_slo_s or 2.0, a.tbt_slo_s or 0.2, started[0],
                      phase_starts())
        progress(f"results in {out}/ (timeline.png, decisions.jsonl, requests.jsonl, profile.json, summary.json)")
        progress(f"  requests sent {summary['requests_sent']}, failed {summary['failed_requests']}; SLO attainment "
                 f"TTFT {summary['slo_attainment_ttft']:.3f}, TBT {summary['slo_attainment_tbt']:.3f}")
        progress(f"  scale-outs {summary['num_scale_out']} ({summary['num_prewarm']} started by the forecast before "
                 f"the load asked), scale-ins {summary['num_scale_in']}, terminations {summary['num_terminate']}, "
                 f"restores {summary['num_restore']}; up to {summary['max_deployment_groups']} deployment groups; "
                 f"{summary['num_forecast_holds']} holds the forecast asked for")
        progress(f"  Ready before the repeated ramp: {summary['ready_before_repeat']} (the first ramp asked for "
                 f"{summary['decode_asked_by_first_ramp']} decode)")
        progress(f"  P:D the controller used: {summary['prefill_per_decode_min']} to "
                 f"{summary['prefill_per_decode_max']}; instance-seconds: prefill "
                 f"{summary['instance_seconds']['prefill']:.0f}, decode {summary['instance_seconds']['decode']:.0f}")
        svc.undeploy(service.name, address)
        return 0 if summary["failed_requests"] == 0 else 1
    finally:
        svc.disconnect()
        if started_here:
            local_cluster.down(progress=progress)
