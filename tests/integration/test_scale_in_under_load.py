"""Scale-in under load loses nothing: the real controller actor, real Ray Serve (external scaling, graceful
shutdown, our request router) and the real ingress, in front of stub engine replicas (allowed here) that stream
tokens at a fixed pace and report to the controller like the engine servers do. A square-wave trace replays
open-loop through the load generator, so the controller scales out on each high phase and withdraws, observes
and terminates on each low one. Midway the controller actor and then Serve's controller are killed (both are
restarted by Ray), then the head's GCS server is killed and started again (the cluster runs with GCS fault
tolerance, its tables in Redis, as a KubeRay head-pod restart would): serving goes on and the controller resumes
after each.

Every request is accounted for (sent = ok + shed + failed) with failed = 0, over >= 20 replica terminations
that each followed a withdrawal. Bounded: the trace is finite, every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from bench.load import loadgen
from bench.load.traces import TraceRequest
from bench.results_io import merge_result
from tests.conftest import TEST_RESULTS
from common.config import parse_cluster_spec, parse_service_spec
from common.vocab import DeploymentGroup, Role, controller_name, deployment_name, group_app_name
from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc

TEMP_DIR = "/tmp/hsray-scalein"
PORT = 8393
SERVICE = "churn"
GROUP = "dg-a"
TBT_S = 0.05  # the stub's pace: 20 tokens/s per stream (light: the 2-core box also runs Ray, Serve and the client)
OUTPUT_TOKENS = 16
PHASE_S, PHASES = 12.0, 16  # high, low, high, ... ; 8 cycles
HIGH_RPS, LOW_RPS = 5.0, 0.5  # ~4 and ~0.4 instances' worth at 20 tokens/s per instance
MIN_TERMINATIONS = 20
DECISIONS = f"{TEMP_DIR}/decisions.jsonl"  # appended by the controller across its restart
CLUSTER = parse_cluster_spec({
    "head": {"num_cpus": 1, "memory_gb": 1.5, "gcs_port": 6411, "dashboard_port": 8293, "redis_port": 6415},
    "nodes": [{"name": "l20s", "gpu_type": "L20", "num_gpus": 4, "s1": "s1-a", "s2": "s2-0", "num_cpus": 4,
               "memory_gb": 1},
              {"name": "h20s", "gpu_type": "H20", "num_gpus": 4, "s1": "s1-a", "s2": "s2-0", "num_cpus": 4,
               "memory_gb": 1}],
})
SPEC = parse_service_spec({
    "name": SERVICE,
    "roles": {"prefill": {"gpu_types": ["L20"], "num_cpus_per_replica": 0.1},
              "decode": {"gpu_types": ["H20"], "num_cpus_per_replica": 0.1}},
    "deployment_groups": [{"name": GROUP, "domain": "s1-a", "prefill_replicas": 1, "decode_replicas": 1}],
    "ingress": {"port": PORT, "request_timeout_s": 60},
    "autoscaling": {"control_period_s": 1, "target_decode_tps_per_instance": 20, "prefill_per_decode": 1.0,
                    "min_prefill": 1, "max_prefill": 4, "min_decode": 1, "max_decode": 4,
                    "scale_out_cooldown_s": 1, "scale_in_cooldown_s": 2, "latency_cooldown_s": 1,
                    "max_step_fraction": 1.0, "soft_scale_in_window_s": 2, "signal_window_s": 4,
                    "staleness_limit_s": 15, "report_interval_s": 0.5, "decision_log": DECISIONS},
})


def _stub(role: Role):
    """A stand-in engine replica of one role: it reports like `serving.engines` (cumulative tokens, running
    requests, the routable answer) and the decode one streams `max_tokens` tokens at TBT_S each."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from common import histogram
    from common.wire import ReplicaReport
    from serving.reporting import report_forever

    @serve.deployment(name=deployment_name(SERVICE, GROUP, role), num_replicas=1, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=60,
                      request_router_config=RequestRouterConfig(
                          request_router_class="serving.routing:AdmittedReplicaRouter",
                          request_router_kwargs={"default_routable": False}, request_routing_stats_period_s=0.5,
                          request_routing_stats_timeout_s=5))
    class StubEngine:
        async def __init__(self, *prefill):
            self.tokens, self.running, self.routable = 0, 0, False
            self.id = serve.get_replica_context().replica_id.unique_id
            self.reporter = asyncio.get_running_loop().create_task(report_forever(
                controller_name(SERVICE), "report_replica", 0.5, self._report, self._on_answer))

        def _report(self) -> dict:
            return ReplicaReport(self.id, GROUP, role.value, self.tokens, 0, self.running,
                                 tbt_hist=tuple(histogram.empty())).to_wire()

        def _on_answer(self, answer: dict) -> None:
            self.routable = bool(answer.get("routable", self.routable))

        async def record_routing_stats(self) -> dict:
            return {"routable": self.routable}

        async def completions(self, body, info=None):
            self.running += 1
            try:
                for i in range(body.max_tokens):
                    await asyncio.sleep(TBT_S)
                    self.tokens += 1
                    yield f'data: {{"id": "s", "object": "text_completion", "choices": [{{"index": 0, "text": "t{i}"}}]}}\n\n'
                usage = {"prompt_tokens": 1, "completion_tokens": body.max_tokens, "total_tokens": body.max_tokens + 1}
                yield f'data: {json.dumps({"id": "s", "object": "text_completion", "choices": [], "usage": usage})}\n\n'
            finally:
                self.running -= 1

    return StubEngine


def _trace() -> list[TraceRequest]:
    out, t = [], 0.0
    for phase in range(PHASES):
        rate = HIGH_RPS if phase % 2 == 0 else LOW_RPS
        end = (phase + 1) * PHASE_S
        while t < end:
            out.append(TraceRequest(t * 1000.0, 8, OUTPUT_TOKENS))
            t += 1.0 / rate
    return out


@pytest.fixture(scope="module")
def service():
    from ray import serve
    from ray.serve.api import _run

    from autoscaler import lifecycle
    from common.wire import RoutingEntry
    from serving.ingress import PDIngressDeployment

    state = local_cluster.up(CLUSTER, temp_dir=TEMP_DIR)
    Path(DECISIONS).unlink(missing_ok=True)
    try:
        svc.connect(state.address)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        group = DeploymentGroup(GROUP, SERVICE, "s1", "s1-a", "L20", "H20", 1, 1)
        app = _stub(Role.DECODE).bind(_stub(Role.PREFILL).bind())
        _run(app, _blocking=True, name=group_app_name(SERVICE, GROUP), route_prefix=None, external_scaler_enabled=True)
        lifecycle.start(SPEC, "unused", [(group, 0)])
        card = {"id": "stub", "object": "model", "owned_by": "test", "permission": [], "metadata": {}}
        ingress = serve.deployment(PDIngressDeployment, name="ingress", ray_actor_options={"num_cpus": 0},
                                   max_ongoing_requests=1000)
        serve.run(ingress.bind(
            groups={GROUP: RoutingEntry(group_app_name(SERVICE, GROUP), deployment_name(SERVICE, GROUP, Role.DECODE),
                                        1.0, group)},
            model_card=card, request_timeout_s=60, stream_idle_timeout_s=30, controller=controller_name(SERVICE),
            report_interval_s=0.5, service=SERVICE), name=SERVICE, route_prefix="/")
        yield SPEC
    finally:
        lifecycle.stop(SERVICE)
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def _kill_and_wait_restart(actor_name: str, namespace: str) -> None:
    import ray

    ray.kill(ray.get_actor(actor_name, namespace=namespace), no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            actor = ray.get_actor(actor_name, namespace=namespace)
            ray.get(actor.__ray_ready__.remote(), timeout=5)
            return
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"{actor_name} did not come back within 60 s")


def test_scale_in_under_load_loses_no_request_and_survives_controller_and_gcs_restarts(service):
    from common.vocab import CONTROLLER_NAMESPACE

    trace = _trace()
    cfg = loadgen.LoadConfig(url=f"http://127.0.0.1:{PORT}", model="stub", request_timeout_s=60,
                             drain_timeout_s=90, max_requests=len(trace))
    planned = loadgen.plan(cfg, trace)
    load = threading.Thread(target=lambda: asyncio.run(loadgen.replay(cfg, planned, ["hi"] * len(planned))),
                            daemon=True)
    load.start()
    # the controller actor, then Serve's controller, killed mid-run (Ray restarts both; the first resumes)
    time.sleep(3.3 * PHASE_S)
    killed_at = time.time()
    _kill_and_wait_restart(controller_name(SERVICE), CONTROLLER_NAMESPACE)
    time.sleep(2 * PHASE_S)
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    _kill_and_wait_restart(SERVE_CONTROLLER_NAME, SERVE_NAMESPACE)
    time.sleep(2 * PHASE_S)
    gcs_restarted_at = time.time()
    local_cluster.restart_gcs(TEMP_DIR)
    load.join(timeout=PHASES * PHASE_S + 200)
    assert not load.is_alive(), "the load generator outlived its bounds"

    results = [r for _, r in planned]
    ok = [r for r in results if r.ok]
    shed = [r for r in results if r.http_status == 429]
    failed = [r for r in results if not r.ok and r.http_status != 429]
    log = [json.loads(line) for line in Path(DECISIONS).read_text().splitlines()]
    terminations, after_restart, after_gcs, previous = 0, 0, 0, None
    for entry in log:  # a termination lowers the target after the withdrawal the soft window observed
        total = entry["target_prefill"] + entry["target_decode"]
        if previous is not None and entry["action"] == "terminate_withdrawn" and total < previous:
            terminations += previous - total
            after_restart += previous - total if entry["t"] > killed_at else 0
            after_gcs += previous - total if entry["t"] > gcs_restarted_at else 0
        previous = total
    actions = sorted({e["action"] for e in log})
    figures = {"sent": len(results), "ok": len(ok), "shed": len(shed), "failed": len(failed),
               "replicas_terminated_after_withdrawal": terminations, "of_which_after_controller_restart":
               after_restart, "of_which_after_gcs_restart": after_gcs, "decisions": len(log),
               "faults": ["controller actor killed", "Serve controller killed", "GCS server killed and restarted"]}
    print(f"\nscale-in under load: {json.dumps(figures)}; actions {actions}")
    merge_result("reliability", "scale_in_under_load", {
        "what": "real controller, Serve and ingress; stub engines (20 tokens/s per stream); square-wave trace "
                f"{HIGH_RPS:g}/{LOW_RPS:g} req/s in {PHASES} phases of {PHASE_S:g} s; 1-4 P and D",
        **figures, "accounted": len(ok) + len(shed) + len(failed) == len(results)}, TEST_RESULTS / "reliability.json")
    assert len(ok) + len(shed) + len(failed) == len(results)
    assert not failed, [(r.status, r.http_status, r.error) for r in failed[:5]]
    assert terminations >= MIN_TERMINATIONS, actions
    assert after_restart >= 1  # the restarted controller resumed scaling
    assert after_gcs >= 1  # and went on after the GCS restart
