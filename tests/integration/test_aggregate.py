"""Non-streaming requests served as streams at the ingress (serving.aggregate): which requests qualify, the
stream's items in every shape the decode server yields, and the assembled response."""

from __future__ import annotations

import json

import pytest

from serving.aggregate import as_stream, assemble, chunks_of, unmeasured_reason
from serving.ray_llm import ChatCompletionRequest, CompletionRequest


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


CHAT = [
    {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"content": "lo"},
                                                          "finish_reason": "length", "stop_reason": None}]},
    {"id": "c1", "created": 5, "model": "m", "choices": [],
     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]


def test_chat_chunks_in_every_shape_assemble_into_one_response():
    items = [sse(CHAT[0]) + sse(CHAT[1]), [CHAT[2]], sse(CHAT[3]) + "data: [DONE]\n\n"]
    chunks = [c for item in items for c in chunks_of(item)]
    assert chunks == CHAT
    out = assemble(chunks, chat=True)
    assert out["object"] == "chat.completion" and out["id"] == "c1" and out["model"] == "m"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                               "finish_reason": "length", "stop_reason": None}]
    assert out["usage"]["completion_tokens"] == 2


def test_completion_chunks_assemble_and_an_error_chunk_is_an_error():
    chunks = [{"id": "t", "created": 1, "model": "m", "choices": [{"index": 0, "text": "a"}]},
              {"id": "t", "created": 1, "model": "m", "choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]}]
    out = assemble(chunks, chat=False)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "ab"
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"] is None
    with pytest.raises(ValueError, match="engine died"):
        assemble(chunks + [{"error": {"message": "engine died", "code": 500}}], chat=False)
    with pytest.raises(ValueError, match="before its first chunk"):
        assemble([], chat=True)


def test_which_requests_are_served_as_streams():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert unmeasured_reason(chat) is None
    streamed = as_stream(chat)
    assert streamed.stream and streamed.stream_options.include_usage and not chat.stream
    assert streamed.messages == chat.messages and streamed.max_tokens == 4
    assert unmeasured_reason(chat.model_copy(update={"n": 2})) == "n"
    assert unmeasured_reason(chat.model_copy(update={"logprobs": True})) == "logprobs"
    completion = CompletionRequest(model="m", prompt="hi", max_tokens=4)
    assert unmeasured_reason(completion) is None and as_stream(completion).stream_options.include_usage
    assert unmeasured_reason(completion.model_copy(update={"echo": True})) == "echo"
    assert unmeasured_reason(completion.model_copy(update={"return_token_ids": True})) == "token_ids"
    assert unmeasured_reason(completion.model_copy(update={"stream": True})) is None  # measured as it is


def test_the_ingress_measures_ttft_of_a_non_streaming_request_and_answers_it_whole():
    """Defect 12: TTFT was recorded only for streaming requests, so the safety net was blind to non-streaming
    traffic. The ingress asks the decode server for a stream, records the first chunk's time, and answers
    one JSON response; a request it cannot assemble exactly keeps the plain call and is counted."""
    import asyncio

    from common import histogram
    from common.wire import RoutingEntry
    from serving.ingress import PDIngress

    asked = []

    class Method:
        def remote(self, body, info):
            asked.append(body)

            async def gen():
                if body.stream:
                    for chunk in CHAT:
                        yield sse(chunk)
                else:
                    yield {"id": "plain", "object": "chat.completion", "choices": []}
            return gen()

    class Handle:
        chat = Method()

        def options(self, **kwargs):
            return self

    card = {"id": "m", "object": "model", "owned_by": "me", "permission": [], "metadata": {}}
    ingress = PDIngress({"a": RoutingEntry("app-a", "a:decode", 1)}, card, request_timeout_s=5,
                        stream_idle_timeout_s=5, handles={"a": Handle()})
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    response = asyncio.run(ingress._process_llm_request(request, "chat"))
    answer = json.loads(response.body)
    assert response.status_code == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hello" and answer["usage"]["total_tokens"] == 5
    assert asked[-1].stream and not request.stream
    assert sum(ingress._ttft_hist["a"]) == 1  # the first chunk's time is in the TTFT the controller reads

    asyncio.run(ingress._process_llm_request(request.model_copy(update={"n": 2}), "chat"))
    assert not asked[-1].stream and sum(ingress._ttft_hist["a"]) == 1  # plain call: not measured (counted)
    assert histogram.NUM_BUCKETS == len(ingress._ttft_hist["a"])
