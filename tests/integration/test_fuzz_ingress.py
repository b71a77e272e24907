"""Bad input at the OpenAI endpoint: schema-driven fuzzing of the real ingress (our PDIngress on Ray Serve,
FastAPI and ray.llm's request models) in front of a stub decode deployment (stub engines are allowed here).
Bounded by count: every case must get a non-5xx answer within its timeout; cases and outcomes are counted.
The fuzzer is schemathesis, fed the `/openapi.json` the ingress serves, in positive and negative modes, plus
the two inputs that made a first schema-driven run answer 500 (a null where the chat body needs a list, a body
sent with an undeclared content type)."""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest

from bench.results_io import merge_result
from tests.conftest import TEST_RESULTS
from common.config import parse_cluster_spec
from heteroscale_ray import local_cluster
from heteroscale_ray import service as svc

TEMP_DIR = "/tmp/hsray-fuzz"
PORT = 8391
BASE = f"http://127.0.0.1:{PORT}"
SPEC = parse_cluster_spec({
    "head": {"num_cpus": 1, "memory_gb": 1, "gcs_port": 6401, "dashboard_port": 8283},
    "nodes": [{"name": "n1", "gpu_type": "L20", "num_gpus": 1, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1}],
})
CASES_PER_OPERATION = 60  # per mode; the whole run stays around a minute


def _stub_decode():
    from ray import serve

    @serve.deployment(name="fuzz-decode", ray_actor_options={"num_cpus": 0})
    class StubDecode:
        """Answers like an engine: one non-streaming response, or three SSE chunks when streaming."""

        def __init__(self):  # the response models import vLLM: at start-up, not within a request's timeout
            from ray.llm._internal.serve.core.configs.openai_api_models import (
                ChatCompletionResponse,
                CompletionResponse,
            )

            self.models = ChatCompletionResponse, CompletionResponse

        async def _answer(self, body, kind):
            ChatCompletionResponse, CompletionResponse = self.models
            if getattr(body, "stream", False):  # the ingress asks non-streaming requests as streams too
                for piece in ("o", "k"):
                    choice = {"index": 0, "delta": {"content": piece}} if kind == "chat.completion" else \
                        {"index": 0, "text": piece}
                    yield f'data: {json.dumps({"id": "x", "object": f"{kind}.chunk", "choices": [choice]})}\n\n'
                return
            if kind == "chat.completion":
                yield ChatCompletionResponse(model=body.model, choices=[{
                    "index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
            else:
                yield CompletionResponse(model=body.model, choices=[{"index": 0, "text": "ok", "finish_reason": "stop"}],
                                         usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})

        async def completions(self, body, info=None):
            async for chunk in self._answer(body, "text_completion"):
                yield chunk

        async def chat(self, body, info=None):
            async for chunk in self._answer(body, "chat.completion"):
                yield chunk

    return StubDecode.bind()


@pytest.fixture(scope="module")
def endpoint():
    from ray import serve

    from common.wire import RoutingEntry
    from serving.ingress import PDIngressDeployment

    state = local_cluster.up(SPEC, temp_dir=TEMP_DIR)
    try:
        svc.connect(state.address)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(_stub_decode(), name="fuzz-dg", route_prefix=None)
        card = {"id": "m", "object": "model", "owned_by": "test", "permission": [], "metadata": {}}
        ingress = serve.deployment(PDIngressDeployment, name="ingress", ray_actor_options={"num_cpus": 0})
        serve.run(ingress.bind(groups={"dg": RoutingEntry("fuzz-dg", "fuzz-decode", 1.0)}, model_card=card,
                               request_timeout_s=10, stream_idle_timeout_s=10),
                  name="fuzz", route_prefix="/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{BASE}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield BASE
    finally:
        svc.disconnect()
        local_cluster.down(temp_dir=TEMP_DIR)


def test_the_inputs_that_answered_500_get_400s(endpoint):
    chat = f"{endpoint}/v1/chat/completions"
    null_messages = httpx.post(chat, json={"model": "m", "messages": None}, timeout=10)
    assert null_messages.status_code == 400, null_messages.text
    assert "messages" in null_messages.json()["error"]["message"]
    undeclared = httpx.post(chat, content=json.dumps({"model": "m", "messages": []}),
                            headers={"content-type": "text/plain"}, timeout=10)
    assert 400 <= undeclared.status_code < 500, undeclared.text
    for body in (b"{", b"[]", b"null", b'{"model": 1, "prompt": {}}', b"\xff\xfe"):
        answer = httpx.post(f"{endpoint}/v1/completions", content=body,
                            headers={"content-type": "application/json"}, timeout=10)
        assert answer.status_code == 400 and "error" in answer.json(), (body, answer.text)
    ok = httpx.post(f"{endpoint}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"


def test_schema_driven_fuzzing_finds_no_5xx_and_no_hang(endpoint):
    import hypothesis
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{endpoint}/openapi.json")
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
                                 phases=[hypothesis.Phase.generate], derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                try:
                    response = case.call(base_url=endpoint, timeout=15)
                    code = response.status_code
                except Exception as exc:  # a hang or a dropped connection is a failure too
                    code = type(exc).__name__
                outcomes[f"{op.label} {code}"] += 1
                if not isinstance(code, int) or code >= 500:
                    failures.append(f"{op.label} {mode.value}: {code} for {case.body!r:.300} "
                                    f"({getattr(case, 'media_type', None)})")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # no invalid input exists (e.g. GET /health has no parameter)
                assert mode is GenerationMode.NEGATIVE, op.label
    total = sum(outcomes.values())
    print(json.dumps({"fuzz_cases": total, "outcomes": dict(sorted(outcomes.items()))}, indent=1))
    merge_result("reliability", "fuzz", {
        "what": "schemathesis from /openapi.json, positive + negative, against the real ingress (stub engine)",
        "cases": total, "outcomes": dict(sorted(outcomes.items())),
        "server_errors": sum(n for k, n in outcomes.items() if k.rsplit(" ", 1)[-1].startswith("5")),
        "hangs_or_drops": sum(n for k, n in outcomes.items() if not k.rsplit(" ", 1)[-1].isdigit())},
        TEST_RESULTS / "reliability.json")
    assert total >= 2 * CASES_PER_OPERATION, outcomes
    assert not failures, "\n".join(failures[:20])
