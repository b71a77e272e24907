"""Fleet simulator, fluid model: services, scenarios, per-instance capacity, one tick's latency and throughput,
and the GPU-hour / utilization / SLO accounting every policy shares. Pure Python; no Ray, no clock.

Fluid model, per service and tick (`tick_s`, default 30 s, the policy period):
- arrivals follow the service's `RateShape`; requests have the service's mean input/output lengths;
- a decode instance serves at most `cap_decode` tokens/s: the highest rate whose decode step stays within the
  TBT SLO (`perf_model.saturation_decode_tps`, a stress-test proxy); past it every request misses the TBT SLO
  (continuous batching slows them all; checked against the per-request simulation);
- prefill is an M/M/1-like server per pool: utilization rho = demand / (instances x cap_prefill), TTFT
  sojourn ~ Exp with mean t_prefill / (1 - rho) (+ KV transfer), so P(TTFT <= SLO) = 1 - exp(-(1-rho) SLO / t);
- instances take `startup_s` to become Ready and hold their GPUs meanwhile; withdrawn (soft scale-in)
  instances hold GPUs but serve nothing;
- NVML utilization: a decode instance is busy when it holds at least one request (1 - e^-N, N = mean
  requests in flight per instance); SM activity weights that by the decode step's compute fraction; a prefill
  instance is busy a fraction rho of the time.
The policy under test sees the same signals the live controller will: decode TPS served, TTFT and TBT.
This module holds the model and its accounting; the simulated world our control cycle drives is
`bench/sim/world.py`, the baselines and references `bench/sim/baselines.py`, scenarios `bench/sim/scenarios.py`,
running and reporting `bench/sim/run.py`, the metric study `bench/sim/study.py`, the per-request check
`bench/sim/request_sim.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.load.traces import RateShape
from bench.sim.perf_model import GPUS, MODELS, Instance, kv_transfer_time_s, nvml_utilization, saturation_decode_tps
from common.vocab import NodeInfo

PREFILL_CHUNK_TOKENS = 8192  # tokens one prefill pass batches (chunked prefill), for prefill capacity
# A service whose TTFT SLO no prefill pool can meet for 99 % of requests (one prompt's prefill + KV transfer
# leaves too little of the SLO) is sized at this prefill utilization: close to its best attainable attainment
# (the rho -> 0 limit), at a finite, comparable size; it is reported as infeasible.
INFEASIBLE_PREFILL_RHO = 0.2


@dataclass(frozen=True)
class SimService:
    name: str
    shape: RateShape
    mean_input: int
    mean_output: int
    ttft_slo_s: float
    tbt_slo_s: float
    model: str = "llama-8b"
    prefill_gpu: str = "L20"
    decode_gpu: str = "H20"
    priority: int = 0
    affinity: str = "s2"
    tp_prefill: int = 1  # tensor-parallel degree per role (GPUs per instance)
    tp_decode: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[NodeInfo, ...]
    services: tuple[SimService, ...]
    duration_s: float
    tick_s: float = 30.0
    startup_s: float = 120.0


@dataclass
class Capacity:
    """Per-instance service rates of one service, from the performance model."""

    decode: Instance
    prefill: Instance
    cap_decode_tps: float
    cap_prefill_tps: float
    prefill_time_s: float
    kv_transfer_s: float
    decode_compute_fraction: float
    ratio: float  # prefill instances per decode instance at which both pools saturate together
    prefill_rho_max: float  # highest prefill utilization with P(TTFT <= SLO) >= 0.99 (<= 0: TTFT SLO unreachable)
    ttft_budget_s: float  # the TTFT SLO less the KV transfer
    steps: dict[tuple[int, int], float] = field(default_factory=dict)  # memo: (context, batch) -> step time

    @classmethod
    def of(cls, svc: SimService) -> Capacity:
        model = MODELS[svc.model]
        dec = Instance(GPUS[svc.decode_gpu], model, tp=svc.tp_decode)
        pre = Instance(GPUS[svc.prefill_gpu], model, tp=svc.tp_prefill)
        context = svc.mean_input + svc.mean_output // 2
        cap_d = saturation_decode_tps(dec, context, svc.tbt_slo_s)
        if cap_d <= 0:
            raise ValueError(f"service {svc.name}: no decode batch of {svc.model} on {svc.decode_gpu} meets "
                             f"TBT SLO {svc.tbt_slo_s}s")
        per_pass = max(1, PREFILL_CHUNK_TOKENS // svc.mean_input)
        cap_p = per_pass * svc.mean_input / pre.prefill_time_s([svc.mean_input] * per_pass)[0]
        batch = max(1, round(cap_d * dec.decode_step_time_s([context])[0]))
        _, compute_fraction = dec.decode_step_time_s([context] * batch)
        ratio = (svc.mean_input / cap_p) / (svc.mean_output / cap_d)
        prefill_time = pre.prefill_time_s([svc.mean_input])[0]
        kv_s = kv_transfer_time_s(model, svc.mean_input, GPUS[svc.prefill_gpu], tp=svc.tp_prefill)
        budget = max(svc.ttft_slo_s - kv_s, 1e-9)
        rho_max = 1 - prefill_time * math.log(100) / budget  # M/M/1 sojourn: P(TTFT <= SLO) >= 0.99
        return cls(dec, pre, cap_d, cap_p, prefill_time, kv_s, compute_fraction, ratio, rho_max, budget)

    @property
    def feasible(self) -> bool:
        return self.prefill_rho_max > 0

    @property
    def operating_rho(self) -> float:
        """The prefill utilization the oracle and the SLO-feasible ratio size for."""
        return self.prefill_rho_max if self.feasible else INFEASIBLE_PREFILL_RHO

    def best_ttft_attainment(self) -> float:
        """TTFT attainment of an idle prefill pool (the limit as utilization -> 0)."""
        return 1 - math.exp(-self.ttft_budget_s / self.prefill_time_s)

    def slo_ratio(self, svc: SimService, decode_tps_per_instance: float) -> float:
        """Prefill instances per decode instance that meet the TTFT SLO when each decode instance carries
        `decode_tps_per_instance` (the stress test's answer, paper Algorithm 1): prefill may run only at
        `prefill_rho_max` of its saturation rate, not at 100 %."""
        rps_per_decode = decode_tps_per_instance / svc.mean_output
        return rps_per_decode * svc.mean_input / (self.cap_prefill_tps * self.operating_rho)


@dataclass
class Tick:
    """What one service saw in one tick (inputs to attainment, utilization and the policy)."""

    decode_tps: float  # output tokens/s served
    ttft_p90_s: float
    tbt_s: float
    attainment_ttft: float
    attainment_tbt: float
    demand_tps: float  # output tokens/s requested


def _step(cap: Capacity, context: int, batch: int) -> float:
    key = (context, batch)
    if key not in cap.steps:
        cap.steps[key] = cap.decode.decode_step_time_s([context] * batch)[0]
    return cap.steps[key]


def evaluate(svc: SimService, cap: Capacity, rps: float, ready_prefill: int, ready_decode: int) -> Tick:
    """Fluid latency and throughput of one service for one tick at `rps` with these Ready instance counts."""
    demand_tps = rps * svc.mean_output
    if rps <= 0:
        return Tick(0.0, cap.prefill_time_s, 0.0, 1.0, 1.0, 0.0)
    decode_capacity = ready_decode * cap.cap_decode_tps
    served = min(demand_tps, decode_capacity)
    # Past capacity, continuous batching slows every request (per-request simulation: 3.7 % met the TBT SLO at
    # 120 % load), so none meets it; the fluid model first let only the excess miss, which was optimistic.
    attainment_tbt = 1.0 if demand_tps <= decode_capacity else 0.0
    per_instance = served / max(ready_decode, 1)
    context = svc.mean_input + svc.mean_output // 2
    # The smallest batch that sustains the per-instance rate (batch / step time grows with the batch).
    lo, hi = 1, cap.decode.max_decode_batch(context)
    while lo < hi:
        mid = (lo + hi) // 2
        if mid / _step(cap, context, mid) >= per_instance:
            hi = mid
        else:
            lo = mid + 1
    tbt = _step(cap, context, lo)
    if demand_tps > decode_capacity:  # overloaded: steps stretch as the backlog joins the batch
        tbt = max(tbt, svc.tbt_slo_s * demand_tps / max(decode_capacity, 1e-9))
    rho = rps * svc.mean_input / (ready_prefill * cap.cap_prefill_tps) if ready_prefill else math.inf
    if rho < 1:
        budget = max(svc.ttft_slo_s - cap.kv_transfer_s, 0.0)
        attainment_ttft = 1 - math.exp(-(1 - rho) * budget / cap.prefill_time_s)
        ttft_p90 = cap.prefill_time_s / (1 - rho) * math.log(10) + cap.kv_transfer_s
    else:
        attainment_ttft, ttft_p90 = 0.0, svc.ttft_slo_s * 10
    return Tick(served, ttft_p90, tbt, attainment_ttft, attainment_tbt, demand_tps)


def oracle_counts(svc: SimService, cap: Capacity, rps: float) -> tuple[int, int]:
    """The fewest (P, D) that meet both SLOs for >= 99 % of requests at this load (perfect foresight); for an
    infeasible TTFT SLO, the size at `INFEASIBLE_PREFILL_RHO`."""
    if rps <= 0:
        return 1, 1
    d = max(1, math.ceil(rps * svc.mean_output / cap.cap_decode_tps - 1e-9))
    p = max(1, math.ceil(rps * svc.mean_input / (cap.cap_prefill_tps * cap.operating_rho) - 1e-9))
    return p, d


@dataclass
class Instances:
    """A pool pair's instances: Ready ones and starting ones (Ready at `ready_at_s`)."""

    ready_prefill: int = 0
    ready_decode: int = 0
    pending: list[tuple[float, int, int]] = field(default_factory=list)  # (ready_at_s, prefill, decode)

    def promote(self, now_s: float) -> None:
        """Instances whose start-up finished become Ready."""
        for _, p, d in [x for x in self.pending if x[0] <= now_s]:
            self.ready_prefill, self.ready_decode = self.ready_prefill + p, self.ready_decode + d
        self.pending = [x for x in self.pending if x[0] > now_s]

    def pending_counts(self) -> tuple[int, int]:
        return sum(x[1] for x in self.pending), sum(x[2] for x in self.pending)

    def allocated(self) -> tuple[int, int]:
        """(prefill, decode) instances holding GPUs: Ready (withdrawn included) and starting."""
        pending_p, pending_d = self.pending_counts()
        return self.ready_prefill + pending_p, self.ready_decode + pending_d

    def resize(self, target: tuple[int, int], now_s: float, startup_s: float) -> None:
        """Start what is missing (Ready after `startup_s`); terminate the excess at once, starting instances
        first (newest first: they serve nothing yet), then Ready ones."""
        have_p, have_d = self.allocated()
        add_p, add_d = max(0, target[0] - have_p), max(0, target[1] - have_d)
        drop_p, drop_d = max(0, have_p - target[0]), max(0, have_d - target[1])
        for i in range(len(self.pending) - 1, -1, -1):
            at, p, d = self.pending[i]
            take_p, take_d = min(p, drop_p), min(d, drop_d)
            drop_p, drop_d = drop_p - take_p, drop_d - take_d
            self.pending[i] = (at, p - take_p, d - take_d)
        self.pending = [x for x in self.pending if x[1] or x[2]]
        self.ready_prefill, self.ready_decode = self.ready_prefill - drop_p, self.ready_decode - drop_d
        if add_p or add_d:
            self.pending.append((now_s + startup_s, add_p, add_d))


@dataclass
class PolicyResult:
    gpu_hours: float = 0.0
    cost_hours: float = 0.0  # GPU-hours weighted by each GPU type's relative hourly cost (H100 = 1.0)
    gpu_hours_by_role: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    util_weighted: float = 0.0
    sm_weighted: float = 0.0
    util_by_role: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    requests: float = 0.0
    met_ttft: float = 0.0
    met_tbt: float = 0.0
    num_scale_actions: int = 0
    ratio_violations: int = 0
    unplaced: int = 0
    demand_tokens: float = 0.0
    served_tokens: float = 0.0
    per_tick: dict[float, list[float]] = field(default_factory=dict)  # t -> [allocated GPUs, busy GPUs, requests]

    def summary(self) -> dict:
        hours = max(self.gpu_hours, 1e-12)
        return {
            "gpu_hours": round(self.gpu_hours, 3),
            "gpu_hours_by_role": {k: round(v, 3) for k, v in self.gpu_hours_by_role.items()},
            "peak_allocated_gpus": round(max((row[0] for row in self.per_tick.values()), default=0.0)),
            "h100_equivalent_cost_hours": round(self.cost_hours, 3),
            "avg_gpu_util": round(self.util_weighted / hours, 4),
            "avg_sm_activity": round(self.sm_weighted / hours, 4),
            "avg_gpu_util_by_role": {k: round(v / max(self.gpu_hours_by_role[k], 1e-12), 4)
                                     for k, v in self.util_by_role.items()},
            "slo_attainment_ttft": round(self.met_ttft / max(self.requests, 1e-12), 4),
            "slo_attainment_tbt": round(self.met_tbt / max(self.requests, 1e-12), 4),
            "num_scale_actions": self.num_scale_actions,
            "ratio_violations": self.ratio_violations,
            "unplaced_requests": self.unplaced,
            "tokens": {"demanded": round(self.demand_tokens), "served": round(self.served_tokens),
                       "dropped": round(self.demand_tokens - self.served_tokens)},
        }


def role_utils(svc: SimService, cap: Capacity, tick: Tick, rps: float, ready_prefill: int, ready_decode: int
               ) -> tuple[float, float, float, float]:
    """(prefill util, prefill SM activity, decode util, decode SM activity) of Ready instances in a tick."""
    if ready_decode and rps > 0:
        in_flight = rps / ready_decode * (tick.ttft_p90_s / math.log(10) + svc.mean_output * tick.tbt_s)
        util_d, sm_d = nvml_utilization(1 - math.exp(-in_flight), cap.decode_compute_fraction)
    else:
        util_d = sm_d = 0.0
    rho = rps * svc.mean_input / (ready_prefill * cap.cap_prefill_tps) if ready_prefill else 0.0
    util_p, sm_p = nvml_utilization(min(rho, 1.0), 0.9)  # prefill is compute-bound (perf model: > 0.9)
    return util_p, sm_p, util_d, sm_d


def account(result: PolicyResult, svc: SimService, cap: Capacity, tick: Tick, rps: float, ready: tuple[int, int],
            counts: tuple[int, int], tick_s: float, t: float | None = None) -> None:
    """GPU-hours of everything allocated (`counts`: ready, starting, withdrawn) and utilization of the `ready`
    (prefill, decode) instances, for one service-tick."""
    p_all, d_all = counts
    hours = tick_s / 3600
    gpus_p, gpus_d = p_all * cap.prefill.tp, d_all * cap.decode.tp
    result.gpu_hours += (gpus_p + gpus_d) * hours
    result.gpu_hours_by_role["prefill"] += gpus_p * hours
    result.gpu_hours_by_role["decode"] += gpus_d * hours
    result.cost_hours += (gpus_p * cap.prefill.gpu.relative_cost + gpus_d * cap.decode.gpu.relative_cost) * hours
    util_p, sm_p, util_d, sm_d = role_utils(svc, cap, tick, rps, *ready)
    ready_gpus_d, ready_gpus_p = ready[1] * cap.decode.tp, ready[0] * cap.prefill.tp
    result.util_weighted += (util_d * ready_gpus_d + util_p * ready_gpus_p) * hours
    result.sm_weighted += (sm_d * ready_gpus_d + sm_p * ready_gpus_p) * hours
    result.util_by_role["decode"] += util_d * ready_gpus_d * hours
    result.util_by_role["prefill"] += util_p * ready_gpus_p * hours
    requests = rps * tick_s
    result.requests += requests
    result.met_ttft += tick.attainment_ttft * requests
    result.met_tbt += tick.attainment_tbt * requests
    result.demand_tokens += tick.demand_tps * tick_s
    result.served_tokens += tick.decode_tps * tick_s
    if t is not None:
        row = result.per_tick.setdefault(t, [0.0, 0.0, 0.0])
        row[0] += gpus_p + gpus_d
        row[1] += util_d * ready_gpus_d + util_p * ready_gpus_p
        row[2] += requests


def fit_to_fleet(scenario: Scenario, wants: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], int]:
    """Bound per-service (P, D) wishes by the fleet's GPUs: while they exceed it, the lowest-priority services
    shrink (both pools by the same fraction, never below one instance each). Returns the fitted counts and how
    many services were cut. Baselines place nothing, so this is their only capacity limit (ours also has
    the topology's)."""
    fleet = sum(n.total_gpus for n in scenario.nodes)
    tp = {s.name: (s.tp_prefill, s.tp_decode) for s in scenario.services}
    gpus = lambda name, pd: pd[0] * tp[name][0] + pd[1] * tp[name][1]  # noqa: E731
    excess = sum(gpus(n, pd) for n, pd in wants.items()) - fleet
    if excess <= 0:
        return wants, 0
    fitted, cut = dict(wants), 0
    for svc in sorted(scenario.services, key=lambda s: (s.priority, s.name)):
        if excess <= 0:
            break
        p, d = fitted[svc.name]
        have = gpus(svc.name, (p, d))
        keep = max(have - excess, gpus(svc.name, (1, 1)))
        if keep < have:
            f = keep / have
            fitted[svc.name] = (max(1, math.floor(p * f)), max(1, math.floor(d * f)))
            excess -= have - gpus(svc.name, fitted[svc.name])
            cut += 1
    return fitted, cut


def peak_counts(scenario: Scenario, caps: dict[str, Capacity]) -> dict[str, tuple[int, int]]:
    steps = int(scenario.duration_s // scenario.tick_s) + 1
    return {svc.name: oracle_counts(svc, caps[svc.name], max(svc.shape.rate(i * scenario.tick_s)
                                                             for i in range(steps)))
            for svc in scenario.services}
