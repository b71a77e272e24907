"""`heteroscale demo`: bring up the local labelled cluster and the P/D service, send a short burst of requests
through the official `openai` client, print what each deployment group served, tear everything down.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx

from heteroscale_ray import local_cluster, service as svc
from common.config import ClusterSpec, ServiceSpec, check_service_fits_cluster

NUM_REQUESTS = 12
MAX_TOKENS = 32


def _burst(base_url: str, model: str, api_key: str | None) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "unused", timeout=120, max_retries=0)

    def one(i: int) -> dict:
        start = time.monotonic()
        prompt = f"Request {i}: the brau plion trast is"
        if i % 2:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            text, tokens = out.choices[0].text, out.usage.completion_tokens
        else:
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=MAX_TOKENS, temperature=0, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            tokens = None
        return {"i": i, "kind": "completion" if i % 2 else "chat-stream", "latency_s": time.monotonic() - start,
                "tokens": tokens, "text": text}

    with cf.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(NUM_REQUESTS)))


def run(cluster: ClusterSpec, service: ServiceSpec, address: str | None, progress=print) -> int:
    started_here = False
    if address is None:
        check_service_fits_cluster(service, cluster)
        started_here = not local_cluster.is_running()  # a cluster from `heteroscale up` is reused and kept
        address = local_cluster.up(cluster, progress=progress).address
    try:
        url = svc.deploy(service, address, progress=progress)
        progress(f"sending {NUM_REQUESTS} requests (completions + streaming chat) through the openai client")
        results = _burst(url, service.model.id, service.api_key())
        for r in results:
            progress(f"  #{r['i']:02d} {r['kind']:<12} {r['latency_s']*1000:7.0f} ms  {r['text'][:48]!r}")
        headers = {"Authorization": f"Bearer {service.api_key()}"} if service.api_key() else {}
        stats_resp = httpx.get(f"{url}/v1/heteroscale/stats", headers=headers, timeout=10)
        stats_resp.raise_for_status()
        routed = stats_resp.json()["routed"]
        progress("what each deployment group served:")
        for group, role, handle in svc.engine_handles(service):
            labels = handle.placement.remote().result(timeout_s=30)["labels"]
            stats = handle.engine_stats.remote().result(timeout_s=30)
            progress(
                f"  {group} {role.value:<7} on {labels.get('heteroscale.io/node')} "
                f"({labels.get('heteroscale.io/gpu-type')}, S1={labels.get('heteroscale.io/s1')}): "
                f"requests routed={routed.get(group, 0)}, prompt tokens computed={stats['total_prompt_computed_tokens']}, "
                f"prompt tokens via NIXL={stats['total_prompt_external_tokens']}, "
                f"generated={stats['total_generation_tokens']}"
            )
        svc.undeploy(service.name, address)
        return 0
    finally:
        svc.disconnect()
        if started_here:
            local_cluster.down(progress=progress)
