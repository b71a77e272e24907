"""The controller's PromQL signal source against a real Prometheus server (Debian's package) that scrapes a
loopback exporter of the same series the engines and the ingress export: values arrive, a dead exporter turns
stale (not fresh, although Prometheus still answers with its last sample) and the policy holds, naming why; a
Prometheus that does not answer gives missing signals and a hold too."""

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from autoscaler.model import Action, PolicyConfig, Reason, ServiceObservation
from autoscaler.policy import decide_service
from autoscaler.prometheus_source import PrometheusSource
from autoscaler.signals import ReplicaReport, SignalStore
from common import histogram
from common.vocab import Role
from heteroscale_ray import prometheus

PROM_PORT = 9393
EXPORTER_PORT = 9394
SERVICE = "tiny-chat"
SHEDDING = "shedding"
STALE_S = 12.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = CollectorRegistry()
    labels = ("service", "role", "deployment_group")
    decode = Gauge("ray_heteroscale_engine_decode_tokens_per_second", "", labels, registry=registry)
    prefill = Gauge("ray_heteroscale_engine_prefill_computed_tokens_per_second", "", labels, registry=registry)
    tbt = Histogram("ray_heteroscale_engine_tbt_seconds", "", labels, registry=registry, buckets=histogram.BOUNDS_S)
    ttft = Histogram("heteroscale_ingress_ttft_seconds", "", ("service", "deployment_group"), registry=registry,
                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4))
    for replica, tps in (("dg-a", 300.0), ("dg-b", 150.0)):
        decode.labels(SERVICE, "decode", replica).set(tps)
        prefill.labels(SERVICE, "prefill", replica).set(1000.0)
    decode.labels("other-service", "decode", "dg-a").set(9999.0)  # another service's series stays out
    decode.labels(SHEDDING, "decode", "dg-a").set(100.0)  # a service whose ingress sheds a quarter of its load
    routed = Counter("heteroscale_ingress_routed", "", ("service", "deployment_group"), registry=registry)
    shed = Counter("heteroscale_ingress_shed", "", ("service",), registry=registry)

    def offer(admitted: int, refused: int) -> None:
        routed.labels(SHEDDING, "dg-a").inc(admitted)
        shed.labels(SHEDDING).inc(refused)
    server, thread = start_http_server(EXPORTER_PORT, addr="127.0.0.1", registry=registry)
    temp = tmp_path_factory.mktemp("prom")
    url = prometheus.start(str(temp), [f"127.0.0.1:{EXPORTER_PORT}"], port=PROM_PORT, progress=lambda *_: None)

    def observe_ttft():
        for _ in range(200):
            ttft.labels(SERVICE, "dg-a").observe(0.3)
        for group, samples in TBT_SAMPLES.items():  # what the engines re-record from their pushed counts
            for v in samples:
                tbt.labels(SERVICE, "decode", group).observe(v)
    yield {"url": url, "server": server, "observe_ttft": observe_ttft, "temp": temp, "offer": offer}
    server.shutdown()
    from heteroscale_ray.local_cluster import down

    down(str(temp), progress=lambda *_: None)  # Prometheus runs under that temp dir


TBT_SAMPLES = {"dg-a": [0.02] * 80, "dg-b": [0.04] * 20}  # per step: two decode replicas, one slower


def signals(source: PrometheusSource, now_s: float = 1000.0, quantile: float = 0.9):
    return source.signals((), now_s, window_s=30.0, staleness_limit_s=STALE_S, quantile=quantile)


def push_path_tbt(quantile: float) -> float:
    """The push path's TBT on the same samples: each replica's pushed cumulative counts, merged (SignalStore)."""
    store = SignalStore(keep_s=60)
    for t in (0.0, 5.0):
        for group, samples in TBT_SAMPLES.items():
            counts = histogram.empty()
            histogram.add(counts, samples * int(t))
            store.add_replica(ReplicaReport(group, group, Role.DECODE, t, generation_tokens=int(t),
                                            prompt_computed_tokens=0, tbt_hist=tuple(counts)))
    return store.signals({Role.DECODE: list(TBT_SAMPLES)}, 5.0, 10.0, 5.0, quantile).tbt_s.value


def test_shed_requests_count_as_decode_demand(stack):
    """Offered = admitted + shed: 30 admitted and 10 shed per step make 100 decode tokens/s stand for 133."""
    source = PrometheusSource(stack["url"], SHEDDING)
    deadline, sig = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # bounded: rates need two scrapes that saw the counters grow
        stack["offer"](30, 10)
        sig = signals(source)
        if sig.decode_tps.value is not None and sig.decode_tps.value > 100.0:
            break
        time.sleep(1)
    assert 125.0 < sig.decode_tps.value < 140.0, sig  # x4/3 (rate() extrapolation blurs the edges a little)
    assert "shed" in sig.note and "decode demand x1.3" in sig.note, sig.note


def test_values_arrive_then_a_dead_exporter_turns_stale_and_the_policy_holds(stack):
    source = PrometheusSource(stack["url"], SERVICE)
    deadline, sig = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # bounded: a few scrape intervals
        stack["observe_ttft"]()
        sig = signals(source)
        if sig.decode_tps.value is not None and sig.ttft_s.value is not None:
            break
        time.sleep(2)
    assert sig.decode_tps.fresh(1000.0, STALE_S) == 450.0  # both DGs' decode replicas, not the other service
    assert sig.prefill_kv_miss_tps.fresh(1000.0, STALE_S) == 2000.0
    for q in (0.5, 0.9, 0.99):  # the configured quantile of the merged counts, as the push path gives it
        push = push_path_tbt(q)
        assert signals(source, quantile=q).tbt_s.fresh(1000.0, STALE_S) == pytest.approx(push, rel=0.02), q
    assert push_path_tbt(0.5) < 0.03 < push_path_tbt(0.99)  # p50 in the fast replica's bucket, p99 the slow one's
    assert 0.25 < sig.ttft_s.fresh(1000.0, STALE_S) <= 0.5  # p90 of 0.3 s observations, bucket-interpolated
    assert sig.note == ""

    cfg = PolicyConfig(target_decode_tps_per_instance=100.0, prefill_per_decode=1.0, max_prefill=8, max_decode=8,
                       scale_out_cooldown_s=0.0)
    obs = ServiceObservation(decode_tps=sig.decode_tps, ttft_s=sig.ttft_s, tbt_s=sig.tbt_s)
    fresh_decision, _ = decide_service(cfg, None, obs, 1000.0)
    assert fresh_decision.action is Action.SCALE_OUT  # 450 tokens/s on a 100-per-instance target

    # Samples that stopped arriving while Prometheus still answers with them (it stopped scraping, a lagging
    # federation): seen 60 s later, the real sample timestamps make every signal stale, and the policy holds.
    late = PrometheusSource(stack["url"], SERVICE, wall_clock=lambda: time.time() + 60)
    sig = signals(late)
    assert sig.note.startswith("prometheus samples stale: decode_tps 6"), sig.note
    assert sig.decode_tps.value == 450.0 and sig.decode_tps.fresh(1000.0, STALE_S) is None  # answered, but old
    for stale in (sig, None):
        if stale is None:  # the exporter dies: Prometheus marks its series stale, they vanish
            stack["server"].shutdown()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and signals(source).decode_tps.value is not None:
                time.sleep(2)
            stale = signals(source)
            assert stale.decode_tps.value is None and stale.note.startswith("prometheus has no series"), stale.note
        obs = ServiceObservation(decode_tps=stale.decode_tps, ttft_s=stale.ttft_s, tbt_s=stale.tbt_s)
        decision, _ = decide_service(cfg, None, obs, 1000.0)
        assert (decision.action, decision.reason) == (Action.HOLD, Reason.NO_DATA)


def test_a_prometheus_that_does_not_answer_gives_missing_signals_and_says_so():
    sig = signals(PrometheusSource("http://127.0.0.1:1", SERVICE, timeout_s=1.0))
    assert sig.decode_tps.value is None and sig.ttft_s.value is None
    assert sig.note.startswith("prometheus at http://127.0.0.1:1 unavailable")


def test_a_bad_query_is_an_error_not_a_zero(stack):
    from autoscaler.prometheus_source import http_query

    with pytest.raises(ValueError, match="bad_data"):
        http_query(stack["url"], "sum(", 5.0)
