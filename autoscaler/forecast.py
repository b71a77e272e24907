"""Start-up-aware demand forecast of one service: a seasonal profile learned from the service's own earlier
periods (days), corrected by today's level, looked up one measured start-up ahead. Pure: no clock, no I/O.

The profile holds, per bin of the period (`bin_s`), the mean decode tokens/s observed in that bin on earlier
periods (`prev`, blended over periods) and on the current one (`cur`, a running mean). The expected demand at
time u is the history of u's bin (`prev`; for a u in the next period, `prev` with this period's bin folded in,
as the new period will hold it) scaled by today's level: this period's means of the bins over the last h
against the earlier periods' means of the same bins (sums: one near-empty bin, such as a trough's, cannot
swing it), clipped to [1/LEVEL_CLIP, LEVEL_CLIP], and no higher than the same over the last LEVEL_SHARE of
the period (an hour of a day): a spike lifts the level over the last h but hardly over the hour, and the
forecast must not multiply the whole profile by it (a lasting rise lifts both within the hour; until then the
reactive rule serves it, a forecast only raises capacity; a fall shows in both at once). The forecast for a
horizon h is the peak of that over every bin from now to now + h + one bin: a replica started now serves from
now + h on, and capacity cut now takes h to come back, so the peak up to then is what to hold; the extra bin
is the profile's resolution (a ramp recorded inside a bin starts up to one bin before the bin's mean shows it
fully). Widened by the tracked relative forecast error. Cold history (no bin of the last h with both an
earlier and this period's mean, or none of the window's with an earlier one) forecasts nothing: the policy is
reactive there.

What lasts is a season, a spike is an event: a period's bins are folded into the earlier periods' through a
morphological opening of width EVENT_SHARE of the period (30 minutes of a day; a running minimum, then a
running maximum over as many bins), which leaves ramps and plateaus as they are and cuts any rise narrower
than the width to its surroundings. Without it one day's random 10-minute spike came back the next day as a
1.5x phantom the forecast held capacity for. A short event that does repeat at the same time every period is
cut too (the reactive rule and the burst path serve it). An opening under 2 bins wide filters nothing (the
demo's period of minutes in 10-second bins).

Forecast error: every forecast made is kept (at most `MAX_PENDING`) with the time it is for; once that time
has come, |forecast - observed| / observed updates an exponentially weighted mean (`ERROR_WEIGHT`), capped at
`ERROR_CAP`, which widens every later forecast (a poor forecast costs headroom, never the SLO)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaler.frozen import evolve

LEVEL_CLIP = 2.0  # today's level scales the profile by at most x2 either way
PERIOD_WEIGHT = 0.5  # a new period's bin mean blends into the earlier periods' with this weight
ERROR_WEIGHT = 0.1  # exponential weight of each new forecast error
ERROR_CAP = 0.5  # the headroom a poor forecast adds is at most +50 %
MAX_PENDING = 64  # forecasts awaiting their time
LEVEL_SHARE = 1 / 24  # today's level is capped by the level over this share of the period (an hour of a day)
EVENT_SHARE = 1 / 48  # a rise narrower than this share of the period (30 minutes of a day) is not learned


def _opened(values: tuple[float | None, ...], b: int, width: int) -> float | None:
    """Bin `b` of `values` (circular) after a morphological opening of `width` bins: the largest of the minima
    of the `width`-bin windows that hold `b`, never above the bin itself; a window with an unseen bin takes no
    part, and a bin in none keeps its value."""
    v = values[b]
    if v is None or width < 2:
        return v
    n = len(values)
    minima = []
    for start in range(b - width + 1, b + 1):
        window = [values[i % n] for i in range(start, start + width)]
        if all(x is not None for x in window):
            minima.append(min(window))
    return min(v, max(minima)) if minima else v


@dataclass(frozen=True)
class Profile:
    """One service's seasonal profile and forecast-error record (part of the policy's state)."""

    period_s: float
    bin_s: float
    prev: tuple[float | None, ...]  # earlier periods' mean per bin (None: never seen)
    cur: tuple[float | None, ...]  # this period's running mean per bin
    cur_n: tuple[int, ...]  # samples in `cur`
    period_index: int  # the period `cur` belongs to
    error: float = 0.0  # relative forecast error, exponentially weighted
    errors_seen: int = 0
    pending: tuple[tuple[float, float], ...] = ()  # (for time, forecast) awaiting their time

    @staticmethod
    def empty(period_s: float, bin_s: float, now_s: float) -> Profile:
        n = max(1, int(round(period_s / bin_s)))
        return Profile(period_s, period_s / n, (None,) * n, (None,) * n, (0,) * n, int(now_s // period_s))

    @property
    def event_bins(self) -> int:
        """The opening's width in bins (module docstring)."""
        return int(self.period_s * EVENT_SHARE // self.bin_s)

    def _bin(self, t_s: float) -> int:
        return int((t_s % self.period_s) // self.bin_s) % len(self.prev)

    def observe(self, now_s: float, value: float) -> Profile:
        """Record an observed demand at `now_s` (a new period first folds `cur` into `prev`), and score the
        forecasts made for times that have come."""
        p = self
        index = int(now_s // self.period_s)
        if index > p.period_index:
            p = evolve(p.next_period(index), pending=p.pending)
        b = p._bin(now_s)
        n = p.cur_n[b] + 1
        mean = value if p.cur[b] is None else p.cur[b] + (value - p.cur[b]) / n
        p = evolve(p, cur=p.cur[:b] + (mean,) + p.cur[b + 1:], cur_n=p.cur_n[:b] + (n,) + p.cur_n[b + 1:])
        due = [f for t, f in p.pending if t <= now_s]
        if not due:
            return p
        error, seen = p.error, p.errors_seen
        for f in due if value > 0 else ():
            error = min(ERROR_CAP, (1 - ERROR_WEIGHT) * error + ERROR_WEIGHT * abs(f - value) / value)
            seen += 1
        return evolve(p, error=error, errors_seen=seen, pending=tuple(x for x in p.pending if x[0] > now_s))

    def _history(self, now_s: float, t_s: float) -> float | None:
        """The earlier periods' mean for `t_s`'s bin as seen from `now_s`: for a time in a later period, this
        period's mean of that bin (where seen) is folded in, as `next_period` will."""
        b = self._bin(t_s)
        q = self.prev[b]
        if int(t_s // self.period_s) <= int(now_s // self.period_s) or self.cur[b] is None:
            return q
        c = _opened(self.cur, b, self.event_bins)
        return c if q is None else (1 - PERIOD_WEIGHT) * q + PERIOD_WEIGHT * c

    def level(self, now_s: float, lookback_s: float) -> float | None:
        """Today's level against the earlier periods: this period's means of the bins from now - lookback to
        now over the earlier periods' means of the same bins (sums, so one near-empty bin cannot swing it),
        clipped to [1/LEVEL_CLIP, LEVEL_CLIP]; None where no such bin has both (cold history)."""
        index = int(now_s // self.period_s)
        num = den = 0.0
        for k in range(int(math.ceil(lookback_s / self.bin_s)) + 1):
            t = now_s - k * self.bin_s
            if int(t // self.period_s) != index:
                break
            b = self._bin(t)
            if self.cur[b] is not None and self.prev[b] is not None:
                num, den = num + self.cur[b], den + self.prev[b]
        if den <= 0:
            return None
        return min(max(num / den, 1 / LEVEL_CLIP), LEVEL_CLIP)

    def todays_level(self, now_s: float, horizon_s: float) -> float | None:
        """The level the forecast scales the profile by: over the last horizon, capped by the level over the
        last LEVEL_SHARE of the period (module docstring); None on cold history."""
        short = self.level(now_s, horizon_s)
        lasting = self.level(now_s, max(horizon_s, self.period_s * LEVEL_SHARE))
        return short if short is None or lasting is None else min(short, lasting)

    def expected(self, now_s: float, t_s: float, level: float) -> float | None:
        """Demand expected at `t_s` (decode tokens/s): the history of its bin at today's `level`; None where
        that bin has no history."""
        there = self._history(now_s, t_s)
        return None if there is None else there * level

    def forecast(self, now_s: float, horizon_s: float) -> float | None:
        """The peak demand expected from now to now + horizon + one bin (module docstring), at today's level
        (`todays_level`), before the error's widening (`widened`); None on cold history."""
        level = self.todays_level(now_s, horizon_s)
        if level is None:
            return None
        steps = int(math.ceil(horizon_s / self.bin_s)) + 1
        seen = [v for v in (self.expected(now_s, now_s + k * self.bin_s, level) for k in range(steps + 1))
                if v is not None]
        return max(seen) if seen else None

    def widened(self, forecast: float) -> float:
        return forecast * (1 + self.error)

    def next_period(self, index: int) -> Profile:
        """This period's bins folded into the earlier periods', a new period `index` begun (also how a history
        learned elsewhere, e.g. the simulator's tuning day, is carried into a run), through the opening that
        keeps a spike out of the season (module docstring)."""
        width = self.event_bins
        seasonal = tuple(_opened(self.cur, b, width) for b in range(len(self.cur)))
        prev = tuple(c if q is None else (q if c is None else (1 - PERIOD_WEIGHT) * q + PERIOD_WEIGHT * c)
                     for q, c in zip(self.prev, seasonal))
        return evolve(self, prev=prev, cur=(None,) * len(self.cur), cur_n=(0,) * len(self.cur), period_index=index,
                      pending=())

    def remember(self, for_s: float, value: float) -> Profile:
        """Keep a forecast made for `for_s` (its error is scored once that time has come)."""
        pending = (self.pending + ((for_s, value),))[-MAX_PENDING:]
        return evolve(self, pending=pending)

