"""Signals from pushed reports: what engine replicas and the ingress tell the controller, turned into the policy's
per-service observation. Pure: no Ray, no clock (times are the receiver's, passed in).

Why push: Ray 2.60 collects `record_autoscaling_stats()` only for deployments with an `autoscaling_config`, and
external scaling forbids one, so every engine replica and the ingress report to the controller every
`report_interval_s`. Reports carry cumulative counters (tokens) and cumulative histograms (`common.histogram`);
the store differences them over `window_s` per reporter, so rates and percentiles are computed the same way for
every replica and merged correctly:
- decode tokens/s = sum over decode replicas of d(generated tokens)/dt; KV-miss prefill tokens/s likewise over
  prefill replicas' locally computed prompt tokens;
- TBT = the quantile of the decode replicas' merged TBT histograms; TTFT = the quantile of the ingress's merged
  per-DG TTFT histograms (what users see: remote prefill, KV pull and queueing included), never the decode
  engine's local TTFT, and never an average of per-replica percentiles;
- the ingress's admitted requests/s go along (`admitted_rps`): the policy reads zero decode tokens/s while
  requests were admitted as missing data, not as an idle service;
- requests the ingress shed (admission control) are demand too: decode tokens/s is scaled by offered /
  admitted requests in the window, so a pool capped by its own admission bound still scales out;
- a signal is missing (never 0) when a replica that Serve says is RUNNING has no fresh report, when a reporter
  has too few reports to difference, or when a histogram has no sample in the window. Reports of replicas Serve
  no longer lists are ignored, so a killed replica is not counted twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from autoscaler.model import Signal
from common import histogram
from common.vocab import Role


@dataclass(frozen=True)
class ReplicaReport:
    """One engine replica's cumulative counters at `received_s` (controller's clock)."""

    replica_id: str
    group: str
    role: Role
    received_s: float
    generation_tokens: int
    prompt_computed_tokens: int
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    tbt_hist: tuple[int, ...] = ()
    ttft_hist: tuple[int, ...] = ()  # engine-local (excludes remote prefill): reported, not used by the policy


@dataclass(frozen=True)
class IngressReport:
    """The ingress's cumulative per-DG TTFT histograms (first chunk as the client sees it)."""

    ingress_id: str
    received_s: float
    ttft_hist: Mapping[str, tuple[int, ...]]  # DG -> cumulative counts
    inflight: Mapping[str, int] = field(default_factory=dict)
    admitted: int = 0  # requests routed to a DG (cumulative)
    shed: int = 0  # requests refused by admission control (cumulative): demand the engines never saw


@dataclass(frozen=True)
class ServiceSignals:
    decode_tps: Signal
    prefill_kv_miss_tps: Signal
    ttft_s: Signal
    tbt_s: Signal
    ttft_s_by_group: Mapping[str, float] = field(default_factory=dict)
    note: str = ""  # why a signal is missing, or how it was corrected
    admitted_rps: Signal = Signal()  # requests/s the ingress routed to engines (the policy's cross-check)
    queued: Signal = Signal()  # requests waiting in the engines now + shed in the window (the burst path)


class SignalStore:
    """Recent reports per reporter, bounded by time (`keep_s`) and count."""

    def __init__(self, keep_s: float, max_reports: int = 512):
        if keep_s <= 0:
            raise ValueError(f"keep_s ({keep_s}) must be > 0")
        self._keep_s = keep_s
        self._max = max_reports
        self._replicas: dict[str, deque[ReplicaReport]] = {}
        self._ingress: dict[str, deque[IngressReport]] = {}
        self._first_replica_report_s: float | None = None  # when this store (this controller) began to hear

    def add_replica(self, report: ReplicaReport) -> None:
        if self._first_replica_report_s is None:
            self._first_replica_report_s = report.received_s
        self._append(self._replicas, report.replica_id, report, report.received_s)

    def add_ingress(self, report: IngressReport) -> None:
        self._append(self._ingress, report.ingress_id, report, report.received_s)

    def _append(self, table: dict, key: str, report, now_s: float) -> None:
        series = table.setdefault(key, deque(maxlen=self._max))
        series.append(report)
        for k in list(table):  # forget reporters silent for longer than we keep anything
            s = table[k]
            while s and now_s - s[0].received_s > self._keep_s:
                s.popleft()
            if not s:
                del table[k]

    def latest(self, replica_id: str) -> ReplicaReport | None:
        series = self._replicas.get(replica_id)
        return series[-1] if series else None

    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    # ---- windowed values ----------------------------------------------------------------------------------------

    def _window(self, series: Iterable, now_s: float, window_s: float, staleness_s: float):
        """(oldest report inside the window, newest report) of one reporter, or None if stale/too few."""
        reports = [r for r in series if now_s - r.received_s <= window_s]
        if not reports or now_s - reports[-1].received_s > staleness_s:
            return None
        if len(reports) == 1:
            older = [r for r in series if r.received_s < reports[0].received_s]
            if not older:
                return None
            return older[-1], reports[-1]
        return reports[0], reports[-1]

    def signals(self, running: Mapping[Role, Iterable[str]], now_s: float, window_s: float, staleness_s: float,
                quantile: float) -> ServiceSignals:
        """The service's signals from the reports of the replicas Serve lists as RUNNING (`running[role]`).

        Token rates need half a window of history first: a controller that has just started (or restarted)
        holds a second or two of reports, and a rate over them is one request's burst, not the load (it
        scaled a light load out on its first tick). Until then both rates are missing (no data: hold)."""
        rates: dict[Role, float | None] = {}
        since: dict[Role, float] = {}
        tbt_counts = []
        notes = []
        heard = None if self._first_replica_report_s is None else now_s - self._first_replica_report_s
        filling = heard is None or heard < window_s / 2
        if filling:
            notes.append(f"signal window filling: {heard or 0:.0f}s of reports, rates need {window_s / 2:g}s")
        waiting, waiting_at = 0, None
        for role in (Role.DECODE, Role.PREFILL):
            ids = sorted(running.get(role, ()))
            total, oldest, ok = 0.0, now_s, bool(ids)
            for rid in ids:
                span = self._window(self._replicas.get(rid, ()), now_s, window_s, staleness_s)
                if span is None:
                    ok = False
                    notes.append(f"{role.value} replica {rid[:12]} has no fresh report")
                    continue
                first, last = span
                dt = last.received_s - first.received_s
                counter = "generation_tokens" if role is Role.DECODE else "prompt_computed_tokens"
                grown = getattr(last, counter) - getattr(first, counter)
                total += max(grown, 0) / dt if dt > 0 else 0.0
                oldest = min(oldest, last.received_s)
                waiting += last.num_waiting
                waiting_at = last.received_s if waiting_at is None else min(waiting_at, last.received_s)
                if role is Role.DECODE and last.tbt_hist and first.tbt_hist:
                    tbt_counts.append(histogram.delta(last.tbt_hist, first.tbt_hist))
            if not ids:
                notes.append(f"no RUNNING {role.value} replica")
            rates[role] = total if ok and not filling else None
            since[role] = oldest
        tbt = histogram.quantile(histogram.merge(tbt_counts), quantile) if tbt_counts else None
        ttft_by_group: dict[str, list[int]] = {}
        ingress_fresh = None
        admitted = shed = 0
        admitted_rps = 0.0
        for series in self._ingress.values():
            span = self._window(series, now_s, window_s, staleness_s)
            if span is None:
                continue
            first, last = span
            ingress_fresh = max(ingress_fresh or 0.0, last.received_s)
            admitted += max(0, last.admitted - first.admitted)
            shed += max(0, last.shed - first.shed)
            dt = last.received_s - first.received_s
            admitted_rps += max(0, last.admitted - first.admitted) / dt if dt > 0 else 0.0
            for group, counts in last.ttft_hist.items():
                before = first.ttft_hist.get(group, tuple([0] * len(counts)))
                ttft_by_group[group] = histogram.merge([ttft_by_group.get(group, histogram.empty()),
                                                        histogram.delta(counts, before)])
        if ingress_fresh is None:
            notes.append("no fresh ingress report")
        ttft = histogram.quantile(histogram.merge(ttft_by_group.values()), quantile) if ttft_by_group else None
        per_group = {g: q for g, c in ttft_by_group.items() if (q := histogram.quantile(c, quantile)) is not None}

        if shed and rates[Role.DECODE] is not None:
            # Shed requests are demand the engines never saw: a capped decode TPS must not read as enough
            # capacity. Scale it by offered / admitted requests (an admitted request stands for the mean one).
            factor = (admitted + shed) / max(admitted, 1)
            rates[Role.DECODE] *= factor
            notes.append(f"{shed} of {admitted + shed} requests shed in the window: decode demand x{factor:.2f}")

        def signal(value: float | None, at: float | None) -> Signal:
            return Signal(value, at) if value is not None and at is not None else Signal()

        return ServiceSignals(
            decode_tps=signal(rates[Role.DECODE], since[Role.DECODE]),
            prefill_kv_miss_tps=signal(rates[Role.PREFILL], since[Role.PREFILL]),
            ttft_s=signal(ttft, ingress_fresh),
            tbt_s=signal(tbt, since[Role.DECODE] if rates[Role.DECODE] is not None else None),
            ttft_s_by_group=per_group, note="; ".join(notes), admitted_rps=signal(admitted_rps, ingress_fresh),
            queued=signal(float(waiting + shed), waiting_at))
