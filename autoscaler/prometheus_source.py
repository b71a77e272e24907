"""The controller's signals from PromQL against a Prometheus server: the alternative to the push path
(`autoscaler.signals.SignalStore`), chosen with `autoscaling.signal_source: prometheus`.

Per service (the `service` label every engine and ingress series carries):
- decode tokens/s: the sum of the decode replicas' `ray_heteroscale_engine_decode_tokens_per_second`;
- KV-miss prefill tokens/s: the sum of the prefill replicas' `…_prefill_computed_tokens_per_second`;
- TTFT: the quantile of the ingress histogram `heteroscale_ingress_ttft_seconds` over the signal window;
- TBT: the configured quantile of the decode replicas' merged histogram `…_tbt_seconds` over the signal
  window (the push path's buckets, `common.histogram`), as the push path merges their pushed counts;
- shed demand: requests the ingress refused (`heteroscale_ingress_shed_total`) are demand the engines never saw:
  decode tokens/s is scaled by offered / admitted requests over the window (`…_routed_total` is admitted), as
  the push path does, so a pool capped by its own admission bound still scales out; the admitted rate goes
  along for the policy's zero cross-check.
A replica Serve lists as RUNNING whose series are missing makes its role's rate missing (the engines' gauges
carry a `replica` label), never a smaller sum. Each signal is stamped with the time of the newest raw sample
behind it (`timestamp()`), not the query time. A
target that stops answering gets Prometheus's staleness markers (its series vanish: missing signals); samples
that stop arriving without them (Prometheus stopped scraping, a lagging federation or remote read) are still
answered for up to five minutes, which the timestamps expose. A Prometheus that does not answer, series that
are missing, or samples older than the staleness limit give missing or stale signals with a note, and the
policy holds (never scales in) and says so in the decision log. The HTTP call and the wall clock are
injectable for tests; `now_s` is the caller's clock.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from autoscaler.model import Signal
from autoscaler.signals import ServiceSignals
from common.vocab import Role


@dataclass(frozen=True)
class Query:
    value: str  # PromQL whose single result is the signal
    freshness: str  # PromQL: the newest sample time (Unix s) of the raw series behind it


def service_queries(service: str, quantile: float, window_s: float) -> dict[str, Query]:
    sel = f'service="{service}"'
    window = f"{max(int(round(window_s)), 1)}s"
    engine = "ray_heteroscale_engine_"
    return {
        "decode_tps": Query(f'sum({engine}decode_tokens_per_second{{{sel},role="decode"}})',
                            f'max(timestamp({engine}decode_tokens_per_second{{{sel},role="decode"}}))'),
        "prefill_kv_miss_tps": Query(f'sum({engine}prefill_computed_tokens_per_second{{{sel},role="prefill"}})',
                                     f'max(timestamp({engine}prefill_computed_tokens_per_second{{{sel},role="prefill"}}))'),
        "ttft_s": Query(f"histogram_quantile({quantile}, sum by (le) "
                        f"(rate(heteroscale_ingress_ttft_seconds_bucket{{{sel}}}[{window}])))",
                        f"max(timestamp(heteroscale_ingress_ttft_seconds_count{{{sel}}}))"),
        "tbt_s": Query(f"histogram_quantile({quantile}, sum by (le) "
                       f'(rate({engine}tbt_seconds_bucket{{{sel},role="decode"}}[{window}])))',
                       f'max(timestamp({engine}tbt_seconds_count{{{sel},role="decode"}}))'),
    }


def replica_query(service: str, role: Role) -> str:
    """The replicas of a role that export the role's token rate (`replica` label, one series each)."""
    name = "decode_tokens_per_second" if role is Role.DECODE else "prefill_computed_tokens_per_second"
    return f'group by (replica) (ray_heteroscale_engine_{name}{{service="{service}",role="{role.value}"}})'


def demand_queries(service: str, window_s: float) -> tuple[str, str]:
    """(admitted, shed) requests per second at the service's ingress over the window."""
    sel, window = f'service="{service}"', f"{max(int(round(window_s)), 1)}s"
    return (f"sum(rate(heteroscale_ingress_routed_total{{{sel}}}[{window}]))",
            f"sum(rate(heteroscale_ingress_shed_total{{{sel}}}[{window}]))")


_CLIENT: httpx.Client | None = None


def _client() -> httpx.Client:
    """One client for every query (thread-safe, pooled): a client per call builds an SSL context each time,
    ~45 ms of CPU under the GIL, which starved the controller actor's event loop."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client()
    return _CLIENT


def http_query(url: str, promql: str, timeout_s: float) -> list[dict]:
    try:
        resp = _client().get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=timeout_s)
    except httpx.HTTPError as exc:  # unreachable or too slow: an OSError like any other I/O failure
        raise ConnectionError(f"Prometheus at {url}: {type(exc).__name__}: {exc}") from exc
    try:
        body = resp.json()
    except json.JSONDecodeError:
        body = {"errorType": f"HTTP {resp.status_code}", "error": resp.text[:200]}
    if body.get("status") != "success":
        raise ValueError(f"PromQL {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


class PrometheusSource:
    """`signals()` with the SignalStore's signature, from PromQL."""

    def __init__(self, url: str, service: str, timeout_s: float = 5.0,
                 fetch: Callable[[str, str, float], list[dict]] = http_query, wall_clock: Callable[[], float] = time.time):
        self.url, self.service, self.timeout_s = url, service, timeout_s
        self._fetch, self._wall = fetch, wall_clock

    def _scalar(self, promql: str) -> float | None:
        result = self._fetch(self.url, promql, self.timeout_s)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None

    def signals(self, running, now_s: float, window_s: float, staleness_limit_s: float, quantile: float
                ) -> ServiceSignals:
        """As SignalStore's: `running[role]` are the replica ids Serve lists as RUNNING; a sum over fewer
        replicas than run would read as less demand, so a running replica without series makes its role's
        rate missing (as a replica without a fresh report does on the push path)."""
        queries = service_queries(self.service, quantile, window_s)
        try:
            values = {name: (self._scalar(q.value), self._scalar(q.freshness)) for name, q in queries.items()}
            admitted, shed = (self._scalar(q) for q in demand_queries(self.service, window_s))
            silent = {}
            for role, name in ((Role.DECODE, "decode_tps"), (Role.PREFILL, "prefill_kv_miss_tps")):
                ids = set((running or {}).get(role, ()))
                if ids:
                    seen = {r.get("metric", {}).get("replica") for r in self._fetch(
                        self.url, replica_query(self.service, role), self.timeout_s)}
                    if ids - seen:
                        silent[name] = sorted(ids - seen)
        except (OSError, ValueError) as exc:
            return ServiceSignals(Signal(), Signal(), Signal(), Signal(),
                                  note=f"prometheus at {self.url} unavailable: {exc}"[:300])
        wall = self._wall()
        signals, stale = {}, []
        for name, (value, sampled) in values.items():
            if value is None or sampled is None:
                signals[name] = Signal()
                continue
            age = max(0.0, wall - sampled)
            if age > staleness_limit_s:
                stale.append(f"{name} {age:.0f}s old")
            signals[name] = Signal(value, now_s - age)  # stamped with the sample's age on the caller's clock
        note = f"prometheus samples stale: {', '.join(stale)}" if stale else ""
        for name, ids in silent.items():
            signals[name] = Signal()
            more = f" (+{len(ids) - 1})" if len(ids) > 1 else ""
            gap = f"{name}: running replica {ids[0][:12]} has no series{more}"
            note = f"{note}; {gap}" if note else gap
        missing = [n for n, s in signals.items() if s.value is None and n not in silent]
        if missing and not note:
            note = f"prometheus has no series for {', '.join(missing)}"
        decode = signals["decode_tps"]
        if shed and decode.value is not None:  # as the push path: counts in the window, an admitted request
            n_admitted, n_shed = (admitted or 0.0) * window_s, shed * window_s  # stands for the mean one
            factor = (n_admitted + n_shed) / max(n_admitted, 1.0)
            signals["decode_tps"] = Signal(decode.value * factor, decode.sampled_at_s)
            shed_note = f"{shed:.2f}/s shed of {shed + (admitted or 0.0):.2f}/s offered: decode demand x{factor:.2f}"
            note = f"{note}; {shed_note}" if note else shed_note
        return ServiceSignals(signals["decode_tps"], signals["prefill_kv_miss_tps"], signals["ttft_s"],
                              signals["tbt_s"], note=note,
                              admitted_rps=Signal(admitted, now_s) if admitted is not None else Signal())
