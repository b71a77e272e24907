"""Data types of the autoscaling core: configuration, observations, decisions and state (all frozen).

Pure: imports nothing of Ray, vLLM, HTTP, the clock or the environment. Times are seconds on the caller's clock
(`now_s` is always an argument). Defaults cite where they come from: (paper) = HeteroScale arXiv 2508.19559,
(assumed) = an engineering default from `shared/reference/paper.md` §10, to be tuned per service.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping

from autoscaler.forecast import Profile
from common.defaults import AUTOSCALING as DEFAULTS
from common.vocab import Role


class Action(str, Enum):
    HOLD = "hold"
    SCALE_OUT = "scale_out"
    SCALE_IN = "scale_in"  # soft: the Decision's withdraw counts leave routing; instances keep running
    RESTORE = "restore"  # withdrawn instances rejoin routing at once (SLOs degraded while observing)
    TERMINATE_WITHDRAWN = "terminate_withdrawn"  # observation window passed with SLOs held: targets drop


class Reason(str, Enum):
    NO_DATA = "no_data"  # decode TPS missing, NaN or stale: hold, never scale in
    WITHIN_BAND = "within_band"  # proportional target inside the hysteresis band
    PROPORTIONAL = "proportional"  # decode TPS outside the band
    ZERO_TRAFFIC = "zero_traffic"  # fresh data, no decode tokens: go to the minimum
    # no decode tokens while the ingress admitted requests (a wedged engine, a stats path reporting nothing):
    # the zero is missing data, not demand, so hold (never scale in)
    NO_DECODE_PROGRESS = "no_decode_progress"
    COOLDOWN = "cooldown"  # would act, but the cooldown since the last action has not passed
    AT_BOUND = "at_bound"  # would act, but the min/max bound is already reached
    LATENCY_MODERATE = "latency_moderate"  # TBT/TTFT past the moderate tier: fixed step out
    LATENCY_SEVERE = "latency_severe"  # past the severe tier: larger fixed step out
    SCHEDULE = "schedule"  # the periodic schedule sets (or floors) the size
    SOFT_SCALE_IN_OBSERVING = "soft_scale_in_observing"
    SOFT_SCALE_IN_DONE = "soft_scale_in_done"  # SLOs held through the window: terminate withdrawn
    SOFT_SCALE_IN_SLO_DEGRADED = "soft_scale_in_slo_degraded"  # SLO breached while observing: restore withdrawn
    LOAD_RETURNED = "load_returned"  # the load came back while observing: restore withdrawn
    CANCEL_STARTING = "cancel_starting"  # a scale-in while replicas still start: those go first, at once
    BUDGET_LIMITED = "budget_limited"  # fleet GPU budget cut this service's target (by priority)
    RATIO = "ratio"  # decode inside its band, the adaptive P:D ratio moved: prefill follows its own demand
    FORECAST = "forecast"  # demand forecast one measured start-up ahead asks for more than is observed now
    BURST = "burst"  # requests queue at the engines (or are shed): withdrawn replicas back first, else a step out
    # a higher-priority service needed the room: a whole group withdrawn, then removed (`autoscaler.fleet`)
    PREEMPTED = "preempted"
    RECLAIM = "reclaim"  # held below its own minimum (preempted): asks its minimum back, placed where room is


class Mode(str, Enum):
    METRICS = "metrics"  # proportional control on decode TPS (+ latency safety net)
    PERIODIC = "periodic"  # the schedule alone
    METRICS_WITH_SCHEDULE_FLOOR = "metrics_with_schedule_floor"  # metrics, never below the schedule


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} ({value}) must be a finite number > 0")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} ({value}) must be a finite number >= 0")


@dataclass(frozen=True)
class LatencyTier:
    """Scale out both pools by `step_fraction` when TBT or TTFT exceeds `slo_multiple` x its SLO."""

    slo_multiple: float
    step_fraction: float

    def __post_init__(self) -> None:
        _positive("slo_multiple", self.slo_multiple)
        _positive("step_fraction", self.step_fraction)


@dataclass(frozen=True)
class ScheduleWindow:
    """A periodic-policy window of the day [start_s, end_s) (seconds after midnight on the caller's clock)."""

    start_s: float
    end_s: float
    total_instances: int  # prefill + decode
    prefill_per_decode: float

    def __post_init__(self) -> None:
        if not 0 <= self.start_s < self.end_s <= 86_400:
            raise ValueError(f"schedule window [{self.start_s}, {self.end_s}) must satisfy 0 <= start < end <= 86400")
        if self.total_instances < 2:
            raise ValueError(f"total_instances ({self.total_instances}) must be >= 2 (one prefill and one decode)")
        _positive("prefill_per_decode", self.prefill_per_decode)

    def contains(self, second_of_day: float) -> bool:
        return self.start_s <= second_of_day < self.end_s


@dataclass(frozen=True)
class PolicyConfig:
    """One service's scaling policy. Validated at construction; every message names the value and the rule."""

    target_decode_tps_per_instance: float  # (paper) from stress tests; (assumed) 0.7 x saturation decode TPS
    prefill_per_decode: float = DEFAULTS["prefill_per_decode"]  # set from the stress test
    min_prefill: int = DEFAULTS["min_prefill"]
    max_prefill: int = DEFAULTS["max_prefill"]
    min_decode: int = DEFAULTS["min_decode"]
    max_decode: int = DEFAULTS["max_decode"]
    hysteresis_band: float = DEFAULTS["hysteresis_band"]
    scale_out_cooldown_s: float = DEFAULTS["scale_out_cooldown_s"]
    scale_in_cooldown_s: float = DEFAULTS["scale_in_cooldown_s"]  # also counted from the last scale-out
    max_step_fraction: float = DEFAULTS["max_step_fraction"]
    max_step_count: int | None = None  # optional absolute cap on one proportional step (decode instances)
    tbt_slo_s: float | None = None  # latency SLOs (percentile as observed); None = that signal is not used
    ttft_slo_s: float | None = None
    latency_tiers: tuple[LatencyTier, ...] = (LatencyTier(1.1, 0.10), LatencyTier(1.5, 0.20))  # (paper) +10/+20 %
    latency_cooldown_s: float = DEFAULTS["latency_cooldown_s"]
    soft_scale_in_window_s: float = DEFAULTS["soft_scale_in_window_s"]  # 0 = terminate at once
    staleness_limit_s: float = DEFAULTS["staleness_limit_s"]
    mode: Mode = Mode.METRICS
    schedule: tuple[ScheduleWindow, ...] = ()
    advisory: bool = False  # compute and export decisions, never actuate
    priority: int = 0  # higher first when the fleet GPU budget is short
    # decode replicas arbitration (a budget cut, a preemption) always leaves the service, prefill from the
    # ratio; 0: a best-effort service may be scaled to zero. None: min_decode.
    fleet_min_decode: int | None = None
    gpus_per_prefill: int = 1
    gpus_per_decode: int = 1
    # Adaptive P:D ratio (`autoscaler.policy`, "Adaptive ratio"): KV-miss prompt tokens/s one prefill instance
    # carries within the TTFT SLO (from the stress test, as the decode target is); None = the fixed ratio.
    target_prefill_tps_per_instance: float | None = None
    ratio_range: float = DEFAULTS["ratio_range"]
    ratio_window_s: float = DEFAULTS["ratio_window_s"]
    ratio_hysteresis: float = DEFAULTS["ratio_hysteresis"]
    # Start-up-aware forecast (`autoscaler.forecast`): the period the demand repeats over (86400: a day), None
    # = reactive only; the profile's bin width.
    forecast_period_s: float | None = None
    forecast_bin_s: float = DEFAULTS["forecast_bin_s"]
    # Burst path: queued requests per ready decode replica past which the policy acts at once (restores a
    # soft scale-in's withdrawn replicas, else steps out like the severe latency tier); None = off.
    burst_queue_per_decode: float | None = None

    def __post_init__(self) -> None:
        _positive("target_decode_tps_per_instance", self.target_decode_tps_per_instance)
        _positive("prefill_per_decode", self.prefill_per_decode)
        if self.target_prefill_tps_per_instance is not None:
            _positive("target_prefill_tps_per_instance", self.target_prefill_tps_per_instance)
            if self.mode is not Mode.METRICS:
                raise ValueError(f"target_prefill_tps_per_instance (the adaptive ratio) needs mode 'metrics', not "
                                 f"{self.mode.value!r}: a schedule sets its own ratio")
        if not (isinstance(self.ratio_range, (int, float)) and math.isfinite(self.ratio_range)
                and self.ratio_range >= 1):
            raise ValueError(f"ratio_range ({self.ratio_range}) must be a finite number >= 1")
        _non_negative("ratio_window_s", self.ratio_window_s)
        if self.forecast_period_s is not None:
            _positive("forecast_period_s", self.forecast_period_s)
            if self.mode is Mode.PERIODIC:
                raise ValueError("forecast_period_s needs mode 'metrics' or 'metrics_with_schedule_floor'")
        _positive("forecast_bin_s", self.forecast_bin_s)
        if self.burst_queue_per_decode is not None:
            _positive("burst_queue_per_decode", self.burst_queue_per_decode)
        if self.forecast_period_s is not None and self.forecast_bin_s > self.forecast_period_s:
            raise ValueError(f"forecast_bin_s ({self.forecast_bin_s}) must be <= forecast_period_s "
                             f"({self.forecast_period_s})")
        if not 0 <= self.ratio_hysteresis < 1:
            raise ValueError(f"ratio_hysteresis ({self.ratio_hysteresis}) must be in [0, 1)")
        for name in ("min_prefill", "max_prefill", "min_decode", "max_decode", "gpus_per_prefill", "gpus_per_decode"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} ({value}) must be an integer >= 0")
        if self.min_decode < 1 or self.min_prefill < 1:
            raise ValueError(f"min_prefill ({self.min_prefill}) and min_decode ({self.min_decode}) must be >= 1 "
                             "(a P/D service needs both roles)")
        if self.fleet_min_decode is not None and not (isinstance(self.fleet_min_decode, int)
                                                      and 0 <= self.fleet_min_decode <= self.min_decode):
            raise ValueError(f"fleet_min_decode ({self.fleet_min_decode}) must be an integer from 0 to min_decode "
                             f"({self.min_decode})")
        if self.max_prefill < self.min_prefill:
            raise ValueError(f"max_prefill ({self.max_prefill}) must be >= min_prefill ({self.min_prefill})")
        if self.max_decode < self.min_decode:
            raise ValueError(f"max_decode ({self.max_decode}) must be >= min_decode ({self.min_decode})")
        if self.max_prefill < math.ceil(self.min_decode * self.prefill_per_decode - 1e-9):
            raise ValueError(
                f"max_prefill ({self.max_prefill}) is below the prefill count the ratio needs at min_decode "
                f"({self.min_decode} x {self.prefill_per_decode:g} -> {math.ceil(self.min_decode * self.prefill_per_decode - 1e-9)})"
            )
        if not 0 <= self.hysteresis_band < 1:
            raise ValueError(f"hysteresis_band ({self.hysteresis_band}) must be in [0, 1)")
        for name in ("scale_out_cooldown_s", "scale_in_cooldown_s", "latency_cooldown_s", "soft_scale_in_window_s"):
            _non_negative(name, getattr(self, name))
        _positive("staleness_limit_s", self.staleness_limit_s)
        _positive("max_step_fraction", self.max_step_fraction)
        if self.max_step_count is not None and self.max_step_count < 1:
            raise ValueError(f"max_step_count ({self.max_step_count}) must be >= 1 or None")
        for name in ("tbt_slo_s", "ttft_slo_s"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        multiples = [t.slo_multiple for t in self.latency_tiers]
        if multiples != sorted(multiples) or len(set(multiples)) != len(multiples):
            raise ValueError(f"latency_tiers must have strictly increasing slo_multiple, got {multiples}")
        if self.mode is not Mode.METRICS and not self.schedule:
            raise ValueError(f"mode {self.mode.value!r} needs a non-empty schedule")
        spans = sorted((w.start_s, w.end_s) for w in self.schedule)
        for (a_start, a_end), (b_start, _) in zip(spans, spans[1:]):
            if b_start < a_end:
                raise ValueError(f"schedule windows overlap: [{a_start}, {a_end}) and one starting at {b_start}")

    @property
    def adaptive_ratio(self) -> bool:
        return self.target_prefill_tps_per_instance is not None

    @property
    def ratio_bounds(self) -> tuple[float, float]:
        """The adaptive ratio's bounds: the configured ratio divided and multiplied by `ratio_range`."""
        return self.prefill_per_decode / self.ratio_range, self.prefill_per_decode * self.ratio_range

    def pair_for_decode(self, num_decode: int, prefill_per_decode: float | None = None) -> tuple[int, int]:
        """The ratio rule: (P, D) with D clamped to its bounds and P = clamp(ceil(D x ratio))."""
        ratio = self.prefill_per_decode if prefill_per_decode is None else prefill_per_decode
        d = min(max(num_decode, self.min_decode), self.max_decode)
        p = min(max(math.ceil(d * ratio - 1e-9), self.min_prefill), self.max_prefill)
        return p, d

    def pair_for_demand(self, decode_demand: float, prefill_per_decode: float | None = None) -> tuple[int, int]:
        """Size from continuous demand, rounding once: x = decode tokens/s / target per decode instance,
        D = ceil(x), P = ceil(x x ratio), each clamped. x is first held inside (min_decode - 1, max_decode] so
        that P stays in the ratio band of the clamped D (`ratio_holds`). Sizing P from the rounded D instead
        turned 0.22 decode instances into 9 prefill instances at P:D 8.9."""
        ratio = self.prefill_per_decode if prefill_per_decode is None else prefill_per_decode
        x = min(max(decode_demand, self.min_decode - 1), self.max_decode)
        d = min(max(math.ceil(x - 1e-9), self.min_decode), self.max_decode)
        p = min(max(math.ceil(x * ratio - 1e-9), self.min_prefill), self.max_prefill)
        return p, d

    def ratio_holds(self, num_prefill: int, num_decode: int, prefill_per_decode: float | None = None) -> bool:
        """What "the ratio always holds" means with sizing from demand: ceil((D-1)·r) <= P <= ceil(D·r), both
        ends clamped to the prefill bounds."""
        ratio = self.prefill_per_decode if prefill_per_decode is None else prefill_per_decode
        clamp = lambda v: min(max(v, self.min_prefill), self.max_prefill)  # noqa: E731
        lo = clamp(math.ceil((num_decode - 1) * ratio - 1e-9))
        hi = clamp(math.ceil(num_decode * ratio - 1e-9))
        return lo <= num_prefill <= hi

    def gpus(self, num_prefill: int, num_decode: int) -> int:
        return num_prefill * self.gpus_per_prefill + num_decode * self.gpus_per_decode

    def fleet_floor(self) -> tuple[int, int]:
        """The (P, D) arbitration always leaves: (0, 0) for a best-effort service (`fleet_min_decode` 0)."""
        if self.fleet_min_decode == 0:
            return 0, 0
        return self.pair_for_decode(self.min_decode if self.fleet_min_decode is None else self.fleet_min_decode)


@dataclass(frozen=True)
class FleetConfig:
    """The services one control cycle arbitrates between, and their shared GPU budget."""

    services: Mapping[str, PolicyConfig]
    gpu_budget: int | None = None  # optional fleet-wide cap, shared by service priority
    gpu_budget_by_type: Mapping[str, int] = field(default_factory=dict)  # optional cap per GPU type
    # after a preempted group is withdrawn, how long before it is removed (at least one control period passes;
    # requests still in flight finish as the world's termination drains them)
    preempt_drain_s: float = 0.0

    def __post_init__(self) -> None:
        floor = sum(c.gpus(*c.fleet_floor()) for c in self.services.values())
        if self.gpu_budget is not None and self.gpu_budget < floor:
            raise ValueError(f"gpu_budget ({self.gpu_budget}) is below the services' minimum sizes ({floor} GPUs)")
        for gpu_type, cap in self.gpu_budget_by_type.items():
            if not isinstance(cap, int) or cap < 0:
                raise ValueError(f"gpu_budget_by_type[{gpu_type!r}] ({cap}) must be an integer >= 0")
        _non_negative("preempt_drain_s", self.preempt_drain_s)


@dataclass(frozen=True)
class Signal:
    """One observed value and when it was sampled. None / NaN / old values are treated as missing."""

    value: float | None = None
    sampled_at_s: float | None = None

    def fresh(self, now_s: float, limit_s: float) -> float | None:
        if self.value is None or self.sampled_at_s is None:
            return None
        if not math.isfinite(self.value) or self.value < 0:
            return None
        if now_s - self.sampled_at_s > limit_s or self.sampled_at_s > now_s + limit_s:
            return None
        return float(self.value)


@dataclass(frozen=True)
class RoleCounts:
    ready: int = 0
    pending: int = 0  # starting, not yet Ready
    withdrawn: int = 0  # running but out of routing (soft scale-in)
    stuck: int = 0  # not Ready for longer than the world's bound (unplaceable, stuck recovering): not starting

    @staticmethod
    def total(parts: Iterable[RoleCounts]) -> RoleCounts:
        """The counts of several groups added up (a service's, from its deployment groups')."""
        parts = list(parts)
        return RoleCounts(sum(p.ready for p in parts), sum(p.pending for p in parts), sum(p.withdrawn for p in parts),
                          sum(p.stuck for p in parts))


@dataclass(frozen=True)
class ServiceObservation:
    """Windowed signals of one service (sums over its decode replicas, percentiles as the SLO defines them)."""

    decode_tps: Signal = Signal()
    prefill_kv_miss_tps: Signal = Signal()
    startup_s: Signal = Signal()  # measured start-up of a new replica (the slower role): the forecast's horizon
    queued: Signal = Signal()  # requests waiting at the engines now + shed lately: the burst path's trigger
    ttft_s: Signal = Signal()
    tbt_s: Signal = Signal()
    prefill: RoleCounts = RoleCounts()
    decode: RoleCounts = RoleCounts()
    admitted_rps: Signal = Signal()  # requests/s the ingress routed to the service's groups (the cross-check)
    gpu_util: Mapping[Role, Signal] = field(default_factory=dict)  # informational (paper: misleading for decode)
    sm_activity: Mapping[Role, Signal] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    services: Mapping[str, ServiceObservation]


@dataclass(frozen=True)
class SoftScaleIn:
    started_s: float
    from_prefill: int
    from_decode: int
    to_prefill: int
    to_decode: int
    to_ratio: float | None = None  # the adaptive ratio in force once the withdrawn instances are terminated
    # a fleet budget cut: never restored, terminated one control period after the withdrawal (no observation)
    forced: bool = False


@dataclass(frozen=True)
class ServiceState:
    target_prefill: int
    target_decode: int
    last_scale_out_s: float | None = None
    last_scale_in_s: float | None = None
    last_latency_step_s: float | None = None
    soft: SoftScaleIn | None = None
    # adaptive ratio: the ratio in force (None: the configured one) and its smoothed estimate
    prefill_per_decode: float | None = None
    ratio_estimate: float | None = None
    ratio_sampled_s: float | None = None
    profile: Profile | None = None  # the start-up-aware forecast's seasonal profile (`autoscaler.forecast`)


@dataclass(frozen=True)
class Preemption:
    """A whole group of `service` given up for `for_service` (higher priority): withdrawn at `started_s`, removed
    once `FleetConfig.preempt_drain_s` has passed and the world holds it withdrawn."""

    service: str
    group: str
    for_service: str
    started_s: float
    num_prefill: int
    num_decode: int


@dataclass(frozen=True)
class PolicyState:
    services: Mapping[str, ServiceState] = field(default_factory=dict)
    preemptions: tuple[Preemption, ...] = ()  # in progress (`autoscaler.fleet`)


@dataclass(frozen=True)
class Diagnostics:
    """The numbers behind a decision (exported as metrics by adapters; never computed there)."""

    decode_tps: float | None = None
    desired_decode_raw: float | None = None  # tps / target, before rounding, clamping, dampening
    ratio_to_current: float | None = None
    dampened: bool = False
    latency_breach: float | None = None  # worst observed/SLO multiple
    budget_gpus: int | None = None
    prefill_kv_miss_tps: float | None = None
    prefill_per_decode: float | None = None  # the ratio in force after the decision
    ratio_estimate: float | None = None  # adaptive ratio: what the signals ask for, smoothed
    forecast_decode_tps: float | None = None  # demand one start-up ahead, widened by the forecast's error
    forecast_error: float | None = None
    note: str = ""


@dataclass(frozen=True)
class ServiceDecision:
    action: Action
    reason: Reason
    target_prefill: int  # absolute: instances that should exist (withdrawn ones included until terminated)
    target_decode: int
    withdraw_prefill: int = 0  # of those, how many are out of routing
    withdraw_decode: int = 0
    advisory: bool = False
    diagnostics: Diagnostics = Diagnostics()


@dataclass(frozen=True)
class Decision:
    services: Mapping[str, ServiceDecision]
