"""One scenario, many days: how a scenario's days differ, and the held-out protocol's tuning and scoring days.

A scenario's `days:` section says what changes from one day to the next (all optional; seeded per scenario,
service and day, so day k is the same day on every run):
- `noise: {sigma, rho, minute_s}`: AR(1) multiplicative noise on the arrival rate, one step per `minute_s`
  (default 60 s), stationary standard deviation `sigma` (log scale), correlation `rho` step to step;
- `phase_jitter_h`: each service's diurnal peak moves by up to this many hours (uniform, per day);
- `level_jitter`: each service's day is `1 +- level_jitter` times as busy (uniform, per day);
- `bursts: {per_day, factor, duration_s, share}`: on `share` of the services, `per_day` spikes of `factor`x
  lasting `duration_s`, at random times of the day;
- `steps: {per_day, factor, share}`: on `share` of the services, the load steps to `factor`x at a random time
  and stays there to the end of the day;
- `trace_offset_s`: a trace-replaying service reads the trace from `k x trace_offset_s` on day k (another
  window of the same trace);
- `mix: {path, window_s, phase_s, max_input, max_output}`: the request mix moves over the day: the trace's
  windows of `window_s` seconds each give one phase of `phase_s` of the day its size distribution, in the
  trace's order from a per-day random start; the service's own fields become the day's average mix (its
  phases' size distributions pooled with equal weight, `pooled_bins`, and their mean sizes averaged), what a
  profile of a whole day measures (until 7c2edcb they stayed the service's configured sizes, a mix the day
  never sent where those differ from the trace's: curation profiled it);
- `kv_miss: {low, high, phase_s}`: the share of prompt tokens not served from the prefix cache moves over the
  day between `low` and `high` (a cosine with a per-service, per-day phase), one value per `phase_s`;
- `profile_error`: the stress test (curation, `heteroscale profile`'s twin) measures a decode instance's
  capacity with this relative error (Gaussian, per service and day), like a live profile;
- `tuning_day`, `scoring_day`: the days settings are chosen on and the day they are scored on (must differ).
Every field is checked when the file is read: one error names the file, the field and the value.
Pure Python; no clock.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from bench.sim.model import Phase, Scenario, SimService, pooled_bins, size_bins


@dataclass(frozen=True)
class DayRate:
    """A base arrival rate (`RateShape` or `TraceRate`) as one day sees it: shifted, scaled, with AR(1)
    minute noise, bursts and steps. Same interface (`rate`, `max_rate`)."""

    base: object
    shift_s: float = 0.0
    level: float = 1.0
    noise: tuple[float, ...] = ()  # multipliers, one per `minute_s`
    minute_s: float = 60.0
    spikes: tuple[tuple[float, float, float], ...] = ()  # (start_s, duration_s, factor)
    steps: tuple[tuple[float, float], ...] = ()  # (start_s, factor) from then on

    def rate(self, t_s: float) -> float:
        hit = self._rates.get(t_s)  # every run over the day asks for the same ticks' rates
        if hit is None:
            hit = self._rates[t_s] = self._rate(t_s)
        return hit

    @functools.cached_property
    def _rates(self) -> dict[float, float]:
        return {}

    def _rate(self, t_s: float) -> float:
        value = self.base.rate(t_s + self.shift_s) * self.level
        if self.noise:
            value *= self.noise[int(t_s // self.minute_s) % len(self.noise)]
        for start, duration, factor in self.spikes:
            if start <= t_s < start + duration:
                value *= factor
        for start, factor in self.steps:
            if t_s >= start:
                value *= factor
        return max(value, 0.0)

    def max_rate(self) -> float:
        peak = self.base.max_rate() * self.level * (max(self.noise) if self.noise else 1.0)
        for _, _, factor in self.spikes:
            peak *= max(factor, 1.0)
        for _, factor in self.steps:
            peak *= max(factor, 1.0)
        return peak


@dataclass(frozen=True, eq=False)  # compared by identity: one parsed spec per scenario file (cheap to hash)
class DaySpec:
    noise_sigma: float = 0.0
    noise_rho: float = 0.8
    noise_minute_s: float = 60.0
    phase_jitter_h: float = 0.0
    level_jitter: float = 0.0
    bursts: tuple[float, float, float, float] | None = None  # per_day, factor, duration_s, share
    steps: tuple[float, float, float] | None = None  # per_day, factor, share
    trace_offset_s: float = 0.0
    mix_rows: tuple[tuple[tuple[tuple[int, int], ...], ...], ...] = ()  # per trace window: its (input, output) rows
    mix_phase_s: float = 3600.0
    kv_miss: tuple[float, float, float] | None = None  # low, high, phase_s
    profile_error: float = 0.0
    tuning_day: int = 1
    scoring_day: int = 2


_KNOWN = {"noise", "phase_jitter_h", "level_jitter", "bursts", "steps", "trace_offset_s", "mix", "kv_miss",
          "profile_error", "tuning_day", "scoring_day"}


def _num(where: str, data: dict, key: str, low: float, high: float = math.inf, default=None,
         integer: bool = False) -> float:
    value = data.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where}.{key} ({value!r}) must be {kind} in [{low:g}, {high:g}]")
    return value


def _section(where: str, data: dict, key: str, fields: set[str]) -> dict | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}.{key} ({value!r}) must be a mapping of {sorted(fields)}")
    unknown = sorted(set(map(str, value)) - fields)
    if unknown:
        raise ValueError(f"{where}.{key}: unknown keys {unknown} (allowed: {sorted(fields)})")
    return value


def parse_days(data, base: Path, path) -> DaySpec:
    """A scenario file's `days:` section (see the module docstring), validated."""
    where = f"{path}: days"
    if not isinstance(data, dict):
        raise ValueError(f"{where} ({data!r}) must be a mapping of {sorted(_KNOWN)}")
    unknown = sorted(set(map(str, data)) - _KNOWN)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(_KNOWN)})")
    spec: dict = {}
    noise = _section(where, data, "noise", {"sigma", "rho", "minute_s"})
    if noise is not None:
        spec["noise_sigma"] = _num(f"{where}.noise", noise, "sigma", 0.0, 1.0)
        spec["noise_rho"] = _num(f"{where}.noise", noise, "rho", 0.0, 0.999, 0.8)
        spec["noise_minute_s"] = _num(f"{where}.noise", noise, "minute_s", 1.0, 86_400.0, 60.0)
    spec["phase_jitter_h"] = _num(where, data, "phase_jitter_h", 0.0, 12.0, 0.0)
    spec["level_jitter"] = _num(where, data, "level_jitter", 0.0, 0.9, 0.0)
    bursts = _section(where, data, "bursts", {"per_day", "factor", "duration_s", "share"})
    if bursts is not None:
        w = f"{where}.bursts"
        spec["bursts"] = (_num(w, bursts, "per_day", 0, 100, integer=True), _num(w, bursts, "factor", 0.1, 20.0),
                          _num(w, bursts, "duration_s", 1.0, 86_400.0), _num(w, bursts, "share", 0.0, 1.0, 1.0))
    steps = _section(where, data, "steps", {"per_day", "factor", "share"})
    if steps is not None:
        w = f"{where}.steps"
        spec["steps"] = (_num(w, steps, "per_day", 0, 10, integer=True), _num(w, steps, "factor", 0.1, 20.0),
                         _num(w, steps, "share", 0.0, 1.0, 1.0))
    spec["trace_offset_s"] = _num(where, data, "trace_offset_s", 0.0, 10 * 86_400.0, 0.0)
    mix = _section(where, data, "mix", {"path", "window_s", "phase_s", "max_input", "max_output"})
    if mix is not None:
        w = f"{where}.mix"
        if not isinstance(mix.get("path"), str):
            raise ValueError(f"{w}.path ({mix.get('path')!r}) must be a trace file path")
        window_s = _num(w, mix, "window_s", 10.0, 86_400.0, 300.0)
        spec["mix_phase_s"] = _num(w, mix, "phase_s", 60.0, 86_400.0, 3600.0)
        try:
            spec["mix_rows"] = trace_windows(base / mix["path"], window_s,
                                             int(_num(w, mix, "max_input", 1, 1 << 20, 8192, integer=True)),
                                             int(_num(w, mix, "max_output", 1, 1 << 20, 2048, integer=True)))
        except OSError as err:
            raise ValueError(f"{w}.path ({mix['path']!r}) cannot be read: {err}") from None
    kv = _section(where, data, "kv_miss", {"low", "high", "phase_s"})
    if kv is not None:
        w = f"{where}.kv_miss"
        low, high = _num(w, kv, "low", 0.01, 1.0), _num(w, kv, "high", 0.01, 1.0)
        if low > high:
            raise ValueError(f"{w}: low ({low}) must be <= high ({high})")
        spec["kv_miss"] = (low, high, _num(w, kv, "phase_s", 60.0, 86_400.0, 3600.0))
    spec["profile_error"] = _num(where, data, "profile_error", 0.0, 0.5, 0.0)
    spec["tuning_day"] = _num(where, data, "tuning_day", 0, 10_000, 1, integer=True)
    spec["scoring_day"] = _num(where, data, "scoring_day", 0, 10_000, 2, integer=True)
    if spec["tuning_day"] == spec["scoring_day"]:
        raise ValueError(f"{where}: tuning_day and scoring_day ({spec['tuning_day']}) must differ "
                         "(settings are scored on a day they were not chosen on)")
    return DaySpec(**spec)


def trace_windows(path: Path, window_s: float, max_input: int, max_output: int
                  ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """A trace's requests cut into consecutive windows of `window_s` seconds: each window's (input, output)
    rows (windows with fewer than 50 requests are merged into the one before)."""
    from bench.load.traces import read_trace, truncate

    rows = truncate(read_trace(path)[0], max_input, max_output)
    if not rows:
        raise ValueError(f"{path}: the trace has no requests")
    windows: list[list[tuple[int, int]]] = []
    for r in rows:
        k = int(r.timestamp_ms / 1000 // window_s)
        while len(windows) <= k:
            windows.append([])
        windows[k].append((r.input_length, r.output_length))
    merged: list[list[tuple[int, int]]] = []
    for w in windows:
        if merged and len(w) < 50:
            merged[-1].extend(w)
        elif w:
            merged.append(w)
    return tuple(tuple(w) for w in merged)


def _rng(scenario: str, service: str, day: int, what: str) -> random.Random:
    return random.Random(f"{scenario}/{service}/{day}/{what}")


def _ar1(rng: random.Random, count: int, sigma: float, rho: float) -> tuple[float, ...]:
    """`count` multipliers exp(x_k - sigma^2/2), x an AR(1) with stationary deviation `sigma` (mean 1)."""
    x, out = rng.gauss(0.0, sigma), []
    innovation = sigma * math.sqrt(1 - rho * rho)
    for _ in range(count):
        out.append(math.exp(x - sigma * sigma / 2))
        x = rho * x + rng.gauss(0.0, innovation)
    return tuple(out)


def _day_service(svc: SimService, spec: DaySpec, scenario: Scenario, day: int) -> SimService:
    name, duration = scenario.name, scenario.duration_s
    pick = lambda what: _rng(name, svc.name, day, what)  # noqa: E731
    base = svc.shape.base if isinstance(svc.shape, DayRate) else svc.shape
    shift = 0.0
    if hasattr(base, "per_bin"):  # a replayed trace: another window of it
        shift = day * spec.trace_offset_s
    if spec.phase_jitter_h:
        shift += pick("phase").uniform(-spec.phase_jitter_h, spec.phase_jitter_h) * 3600
    level = 1.0 + (pick("level").uniform(-spec.level_jitter, spec.level_jitter) if spec.level_jitter else 0.0)
    noise = _ar1(pick("noise"), int(math.ceil(duration / spec.noise_minute_s)) + 1, spec.noise_sigma,
                 spec.noise_rho) if spec.noise_sigma else ()
    spikes, steps = (), ()
    if spec.bursts and pick("bursty").random() < spec.bursts[3]:
        rng = pick("bursts")
        per_day, factor, length, _ = spec.bursts
        spikes = tuple((rng.uniform(0, max(duration - length, 0)), length, factor) for _ in range(int(per_day)))
    if spec.steps and pick("stepped").random() < spec.steps[2]:
        rng = pick("steps")
        steps = tuple((rng.uniform(0.1 * duration, 0.8 * duration), spec.steps[1]) for _ in range(int(spec.steps[0])))
    shape = DayRate(base, shift, level, noise, spec.noise_minute_s, spikes, steps)
    phases = _phases(svc, spec, scenario, day)
    return replace(svc, shape=shape, phases=phases, phase_period_s=max(duration, 1.0))


def _phases(svc: SimService, spec: DaySpec, scenario: Scenario, day: int) -> tuple[Phase, ...]:
    if not spec.mix_rows and not spec.kv_miss:
        return ()
    if spec.mix_rows and spec.kv_miss:
        length = min(spec.mix_phase_s, spec.kv_miss[2])
    else:
        length = spec.mix_phase_s if spec.mix_rows else spec.kv_miss[2]
    count = max(1, int(math.ceil(scenario.duration_s / length)))
    start = _rng(scenario.name, svc.name, day, "mix").randrange(len(spec.mix_rows)) if spec.mix_rows else 0
    kv_phase = _rng(scenario.name, svc.name, day, "kv").uniform(0, 2 * math.pi)
    phases = []
    for i in range(count):
        if spec.mix_rows:
            rows = spec.mix_rows[(start + i) % len(spec.mix_rows)]
            bins = size_bins(rows)
            mean_in = round(sum(r[0] for r in rows) / len(rows))
            mean_out = max(1, round(sum(r[1] for r in rows) / len(rows)))
        else:
            bins, mean_in, mean_out = svc.sizes, svc.mean_input, svc.mean_output
        miss = svc.kv_miss
        if spec.kv_miss:
            low, high, _ = spec.kv_miss
            t = i * length / max(scenario.duration_s, 1.0)
            miss = low + (high - low) * (1 + math.cos(2 * math.pi * t + kv_phase)) / 2
        phases.append(Phase(i * length, bins, mean_in, mean_out, round(miss, 4)))
    return tuple(phases)


def day_of(scenario: Scenario, day: int) -> Scenario:
    """Day `day` of a scenario (its `days` spec applied with that day's seeds); named `<name>@day<k>`."""
    spec = scenario.days or DaySpec()
    services = tuple(_day_service(s, spec, scenario, day) for s in scenario.services)
    if spec.kv_miss:  # the day's average KV-miss share is what a whole-day profile sees
        services = tuple(replace(s, kv_miss=round(sum(p.kv_miss for p in s.phases) / len(s.phases), 4))
                         if s.phases else s for s in services)
    if spec.mix_rows:  # and so is the day's average request mix
        services = tuple(replace(s, sizes=pooled_bins([p.sizes for p in s.phases]),
                                 mean_input=round(sum(p.mean_input for p in s.phases) / len(s.phases)),
                                 mean_output=max(1, round(sum(p.mean_output for p in s.phases) / len(s.phases))))
                         if s.phases else s for s in services)
    base_name = scenario.name.split("@")[0]
    out = replace(scenario, name=f"{base_name}@day{day}", services=services)
    _DAYS[out.name] = (scenario, day)
    return out


_DAYS: dict[str, tuple[Scenario, int]] = {}  # "<name>@day<k>" -> (the scenario it is a day of, k)


def previous_day(day: Scenario) -> Scenario:
    """The day before a day made by `day_of` (what a controller running on `day` learned its history on)."""
    if day.name not in _DAYS:
        raise ValueError(f"scenario {day.name!r} is not a day made by day_of: it has no previous day")
    base, k = _DAYS[day.name]
    return day_of(base, k - 1)


def starts_cold(day: Scenario) -> bool:
    """Whether a controller's history begins on `day` (made by `day_of`): the day before the earlier of its
    scenario's tuning and scoring days, the first day a controller of the held-out protocol runs."""
    if day.name not in _DAYS:
        raise ValueError(f"scenario {day.name!r} is not a day made by day_of")
    base, k = _DAYS[day.name]
    spec = base.days or DaySpec()
    return k <= min(spec.tuning_day, spec.scoring_day) - 1


def tuning_and_scoring(scenario: Scenario) -> tuple[Scenario, Scenario]:
    """The held-out protocol's two days of a scenario: settings come from the first, scores from the second."""
    spec = scenario.days or DaySpec()
    return day_of(scenario, spec.tuning_day), day_of(scenario, spec.scoring_day)
