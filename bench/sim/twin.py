"""The local demo's simulated twin: a recorded `make demo` run replayed through the simulated world, and the two
compared (`bench/scripts/sim_vs_live.py`, issue 20 part 7).

The twin is the live service as the simulator sees it, with nothing taken from the run it is compared with
except its load:
- the cluster and the service are the demo's own spec files (`examples/`); the control cycle is the live
  controller's (the caller passes `HeteroScaleController.cycle_config(spec)`: same policy config, same shape,
  same `place()`), from the groups `heteroscale deploy` creates;
- the engines are the tiny Llama on one CPU core each, timed by the performance model with the constants
  fitted on this machine's vLLM-CPU engine (`bench/results/calibrate_cpu.json`);
- start-up is the cold start of a new deployment group measured by `bench/scripts/restore_vs_cold.py`
  (`bench/results/restore_vs_cold.json`), for both roles;
- the load is the run's own requests (arrival times from `requests.jsonl`, in control-period bins);
- the controller's signal window is kept: decode tokens/s is the mean over the last `signal_window_s`.
The world starts with the spec's deployment groups Ready (as `heteroscale deploy` leaves them) and the cycle
runs at the live run's control period, on the live run's tick phase, until its last logged decision.

What the twin does not model: the two shared cores (each engine gets a whole core here, live two groups share
two cores; the demo's load stays under a third of one decode engine's capacity), engine start-up stealing CPU
from serving engines, the report path's delays (a new replica's tokens/s is missing for its first reports),
and per-request variation (the fluid model).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from autoscaler.cycle import CycleConfig, GroupAction, GroupActionKind
from autoscaler.model import Observation, PolicyState, Signal
from autoscaler.port import decision_entry, step
from bench.sim.model import PolicyResult, Scenario, SimService, Tick
from bench.sim.perf_model import GpuSpec, register_gpu
from bench.sim.scenarios import TraceRate
from bench.sim.world import SimWorld
from common.config import ClusterSpec, ServiceSpec
from common.vocab import DeploymentGroup, NodeInfo

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ROOT / "bench" / "results" / "calibrate_cpu.json"
COLD_START = ROOT / "bench" / "results" / "restore_vs_cold.json"
CPU_CORE = "CPU-1core"  # the GPU type the twin's engines run on (both fake GPU types are one CPU core here)
EVENTS = ("scale_out", "scale_in", "restore", "terminate_withdrawn")


@dataclass(frozen=True)
class LiveRun:
    """A recorded demo run (`runs/demo-<UTC>/`): its decision log, requests and summary."""

    path: Path
    decisions: list[dict]
    requests: list[dict]
    summary: dict

    @property
    def replay(self) -> dict:
        return self.summary["replay"]

    @classmethod
    def load(cls, path: str | Path) -> LiveRun:
        path = Path(path)
        for name in ("decisions.jsonl", "requests.jsonl", "summary.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: a recorded demo run (runs/demo-<UTC>/) has "
                                        "decisions.jsonl, requests.jsonl and summary.json")
        summary = json.loads((path / "summary.json").read_text())
        missing = [k for k in ("service", "load_start_unix", "control_period_s") if k not in summary.get("replay", {})]
        if missing:
            raise ValueError(f"{path / 'summary.json'}: `replay` lacks {missing} (recorded by `heteroscale demo` "
                             "from this version on; older runs cannot be replayed)")

        def read(name: str) -> list[dict]:
            return [json.loads(line) for line in (path / name).read_text().splitlines() if line.strip()]

        decisions = read("decisions.jsonl")
        if not decisions:
            raise ValueError(f"{path / 'decisions.jsonl'} has no decisions")
        return cls(path, decisions, read("requests.jsonl"), summary)

    def span(self) -> tuple[float, float]:
        """The first and last decision, in seconds since the load began."""
        start = self.replay["load_start_unix"]
        return self.decisions[0]["t"] - start, self.decisions[-1]["t"] - start


def cpu_core(calibration: dict) -> GpuSpec:
    """One CPU core running vLLM-CPU, with the constants `bench/scripts/calibrate_cpu.py` fitted."""
    c = calibration["fitted_cpu_constants"]
    return GpuSpec(CPU_CORE, bf16_tflops=c["effective_gflops"] / 1000, mem_bw_tbps=c["nominal_mem_bw_gbps"] / 1000,
                   mem_gb=2.0, relative_cost=0.0, compute_eff=1.0, memory_eff=1.0,
                   step_overhead_s=c["prefill_pass_overhead_ms"] / 1000,
                   decode_step_overhead_s=c["decode_step_overhead_ms"] / 1000,
                   per_sequence_overhead_s=c["per_sequence_overhead_ms"] / 1000)


def twin_scenario(run: LiveRun, service: ServiceSpec, cluster: ClusterSpec, startup_s: float) -> Scenario:
    """The demo's cluster and service as a simulator scenario, loaded with the run's requests; its clock starts
    at the run's first decision (`LiveRun.span`)."""
    if service.name != run.replay["service"]:
        raise ValueError(f"the run served {run.replay['service']!r}, the service spec is {service.name!r}")
    a = service.autoscaling
    period = run.replay["control_period_s"]
    sent = [r for r in run.requests if r["status"] != "not_sent"]
    if not sent:
        raise ValueError(f"{run.path}: no request was sent")
    first, last = run.span()
    bins = [0] * (int((last - first) // period) + 2)  # the trailing bins stay empty: the load has ended
    for r in sent:
        bins[max(0, int((r["scheduled_s"] - first) // period))] += 1
    svc = SimService(service.name, TraceRate(tuple(n / period for n in bins), period),
                     mean_input=round(sum(r["input_tokens"] for r in sent) / len(sent)),
                     mean_output=round(sum(r["requested_output_tokens"] for r in sent) / len(sent)),
                     ttft_slo_s=a.ttft_slo_s or 2.0, tbt_slo_s=a.tbt_slo_s or 0.2, model="tiny-llama",
                     prefill_gpu=CPU_CORE, decode_gpu=CPU_CORE, affinity=service.affinity,
                     startup_prefill_s=startup_s, startup_decode_s=startup_s)
    return Scenario(f"{service.name}-twin", cluster_nodes(cluster), (svc,), last - first + period, tick_s=period,
                    startup_s=startup_s)


def cluster_nodes(cluster: ClusterSpec) -> tuple[NodeInfo, ...]:
    """The cluster's started nodes, every GPU free."""
    return tuple(NodeInfo(n.name, n.gpu_type, n.num_gpus, n.num_gpus, n.s1, n.s2) for n in cluster.nodes)


class TwinWorld(SimWorld):
    """The simulated world with the live controller's signal window on decode tokens/s."""

    def __init__(self, scenario: Scenario, window_s: float):
        super().__init__(scenario)
        self.window_s = window_s
        self._served: dict[str, deque] = {s.name: deque() for s in scenario.services}

    def serve(self, now_s: float, result: PolicyResult) -> None:
        super().serve(now_s, result)
        for name, tick in self.last_ticks.items():
            served = self._served[name]
            served.append((now_s, tick.decode_tps))
            while served and served[0][0] <= now_s - self.window_s:
                served.popleft()

    def observe(self, now_s: float) -> Observation:
        obs = super().observe(now_s)
        services = {}
        for name, s in obs.services.items():
            served = self._served[name]
            windowed = Signal(sum(v for _, v in served) / len(served), now_s) \
                if s.decode_tps.value is not None and served else s.decode_tps
            services[name] = replace(s, decode_tps=windowed)
        return Observation(services=services)

    def start_groups(self, groups: list[DeploymentGroup]) -> None:
        """The deployed service's groups, Ready and idle for a signal window (as `heteroscale deploy` leaves
        them before the load)."""
        self.apply([GroupAction(GroupActionKind.CREATE, g) for g in groups], -math.inf)
        for group in groups:
            self.groups[group.service][group.name].promote(math.inf)
        tick = self.scenario.tick_s
        for name in self._served:  # idle: zero tokens/s, latencies unsampled but present as live
            self.last_ticks[name] = Tick(0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
        for served in self._served.values():
            served.extend((-i * tick, 0.0) for i in range(math.ceil(self.window_s / tick), 0, -1))


def replay(run: LiveRun, service: ServiceSpec, cluster: ClusterSpec, config: CycleConfig,
           groups: list[DeploymentGroup], calibration: dict, startup_s: float) -> tuple[list[dict], PolicyResult]:
    """Run the twin over the live run's span with the live controller's cycle `config`, starting from the
    deployed `groups`: (decision-log entries on the live run's clock, the scored result)."""
    register_gpu(cpu_core(calibration))
    scenario = twin_scenario(run, service, cluster, startup_s)
    world = TwinWorld(scenario, service.autoscaling.signal_window_s)
    world.start_groups(groups)
    state, result, entries = PolicyState(), PolicyResult(), []
    origin = run.replay["load_start_unix"] + run.span()[0]  # the twin's t = 0 on the live clock
    for n in range(int(scenario.duration_s // scenario.tick_s)):
        t = n * scenario.tick_s
        world.advance(t)
        cycle_result, state, observation, _ = step(world, state, t, config)
        entries.append(decision_entry(origin + t, service.name, observation, cycle_result))
        world.serve(t, result)
    return entries, result


def instance_seconds(decisions: list[dict]) -> dict[str, float]:
    """Instances holding a GPU (Ready, starting, withdrawn) integrated over a decision log, per role."""
    out = {"prefill": 0.0, "decode": 0.0}
    for a, b in zip(decisions, decisions[1:]):
        for role in out:
            c = a["observation"][role]
            out[role] += (c["ready"] + c["pending"] + c["withdrawn"]) * (b["t"] - a["t"])
    return {k: round(v, 1) for k, v in out.items()}


def events(decisions: list[dict], start_unix: float) -> list[dict]:
    """The scale events of a decision log (applied, not advisory): seconds since the load began, and action."""
    return [{"t": round(d["t"] - start_unix, 1), "action": d["action"]} for d in decisions
            if d["action"] in EVENTS and not d.get("advisory")]


def startups(decisions: list[dict]) -> list[dict]:
    """Per scale-out of a decision log: seconds from the decision until the new replicas show as starting
    (`realized_s`) and until each role's Ready count reaches the decision's target (None: never in the log)."""
    out = []
    for i, d in enumerate(decisions):
        if d["action"] != "scale_out" or d.get("advisory"):
            continue
        row: dict = {"t": d["t"]}
        for key, done in (("realized_s", lambda o: o["prefill"]["pending"] + o["decode"]["pending"] > 0),
                          ("prefill_ready_s", lambda o: o["prefill"]["ready"] >= d["target_prefill"]),
                          ("decode_ready_s", lambda o: o["decode"]["ready"] >= d["target_decode"])):
            row[key] = next((round(e["t"] - d["t"], 1) for e in decisions[i:] if done(e["observation"])), None)
        out.append({k: v for k, v in row.items() if k != "t"})
    return out


def compare(run: LiveRun, twin: list[dict], result: PolicyResult) -> dict:
    """Scale events matched by kind and order, attainment and instance-seconds per role, against the goals
    (events within one control period, attainment within 2 points, instance-seconds within 10 %)."""
    start, period = run.replay["load_start_unix"], run.replay["control_period_s"]
    live_events, twin_events = events(run.decisions, start), events(twin, start)
    matched, misses = [], []
    for kind in EVENTS:
        lv = [e["t"] for e in live_events if e["action"] == kind]
        tw = [e["t"] for e in twin_events if e["action"] == kind]
        for i in range(max(len(lv), len(tw))):
            pair = {"action": kind, "live_t": lv[i] if i < len(lv) else None, "twin_t": tw[i] if i < len(tw) else None}
            if pair["live_t"] is None or pair["twin_t"] is None:
                misses.append(f"{kind} #{i + 1}: only in the {'twin' if pair['live_t'] is None else 'live run'}")
            else:
                pair["delta_s"] = round(pair["twin_t"] - pair["live_t"], 1)
                if abs(pair["delta_s"]) > period + 1e-6:
                    misses.append(f"{kind} #{i + 1}: {pair['delta_s']:+.1f} s (more than one period, {period} s)")
            matched.append(pair)
    s = result.summary()
    attainment = {"live": {"ttft": run.summary["slo_attainment_ttft"], "tbt": run.summary["slo_attainment_tbt"]},
                  "twin": {"ttft": s["slo_attainment_ttft"], "tbt": s["slo_attainment_tbt"]}}
    for k in ("ttft", "tbt"):
        gap = 100 * (attainment["twin"][k] - attainment["live"][k])
        attainment[f"{k}_points"] = round(gap, 2)
        if abs(gap) > 2.0:
            misses.append(f"{k.upper()} attainment: {gap:+.2f} points (more than 2)")
    live_is, twin_is = instance_seconds(run.decisions), instance_seconds(twin)
    seconds = {"live": live_is, "twin": twin_is}
    for role in live_is:
        ratio = twin_is[role] / live_is[role] if live_is[role] else math.inf
        seconds[f"{role}_ratio"] = round(ratio, 3)
        if abs(ratio - 1) > 0.10:
            misses.append(f"{role} instance-seconds: twin / live {ratio:.3f} (outside 0.9-1.1)")
    return {"events": {"live": live_events, "twin": twin_events, "matched": matched},
            "attainment": attainment, "instance_seconds": seconds,
            "startup": {"live": startups(run.decisions), "twin": startups(twin)},
            "goals": {"event_tolerance_s": period, "attainment_points": 2.0, "instance_seconds_fraction": 0.10},
            "goals_met": not misses, "misses": misses}
