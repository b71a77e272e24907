"""Non-streaming requests served as streams, so the ingress sees their first token (issue 21, defect 12).

The TTFT safety net reads time-to-first-token at the ingress; a non-streaming response arrives whole, so its
first token was invisible and the net was blind to non-streaming traffic. The ingress therefore asks the
decode server for a stream (with usage in its last chunk), records TTFT at the first chunk as for a streaming
client, and answers the client with one response assembled from the chunks: the same text, finish reason,
stop reason and usage as a non-streaming call. Requests whose non-streaming answer holds more than the
chunks carry back exactly here (several choices, log-probs, tools, token ids, echo) keep the plain call;
the ingress counts them (`heteroscale_ingress_ttft_unmeasured_total{reason}`), so the blind spot is a number,
not a surprise.
"""

from __future__ import annotations

import json
from typing import Any, Iterable


def unmeasured_reason(body: Any) -> str | None:
    """Why a non-streaming request keeps the plain call (None: it is served as a stream)."""
    if getattr(body, "stream", False):
        return None
    if "stream_options" not in getattr(type(body), "model_fields", {}):
        return "other"  # not an OpenAI request model this ingress knows how to stream
    if (getattr(body, "n", 1) or 1) != 1:
        return "n"
    if getattr(body, "logprobs", None) or getattr(body, "top_logprobs", None) or getattr(body, "prompt_logprobs",
                                                                                           None):
        return "logprobs"
    if getattr(body, "tools", None) or getattr(body, "functions", None):
        return "tools"
    if getattr(body, "echo", False):
        return "echo"
    if getattr(body, "return_token_ids", False) or getattr(body, "return_tokens_as_token_ids", False):
        return "token_ids"
    return None


def as_stream(body: Any) -> Any:
    """The request as a stream that ends with a usage chunk."""
    options_type = type(body).model_fields["stream_options"].annotation
    options = {"include_usage": True}
    for candidate in getattr(options_type, "__args__", (options_type,)):
        if isinstance(candidate, type) and hasattr(candidate, "model_validate"):
            options = candidate.model_validate({"include_usage": True})
            break
    return body.model_copy(update={"stream": True, "stream_options": options})


async def collect(gen) -> list:
    return [item async for item in gen]


def chunks_of(item: Any) -> list[dict]:
    """The JSON chunks in one item of the decode server's stream (a model, a dict, an SSE string, or a list
    of them); `[DONE]` is dropped."""
    out: list[dict] = []
    for part in item if isinstance(item, list) else [item]:
        if hasattr(part, "model_dump"):
            out.append(part.model_dump())
        elif isinstance(part, dict):
            out.append(part)
        elif isinstance(part, str):
            for event in part.split("\n\n"):
                data = event.strip()
                if data.startswith("data:"):
                    data = data[len("data:"):].strip()
                    if data and data != "[DONE]":
                        out.append(json.loads(data))
        else:
            raise ValueError(f"unexpected stream item {type(part).__name__}")
    return out


def assemble(chunks: Iterable[dict], chat: bool) -> dict:
    """One non-streaming response (chat.completion or text_completion) from a stream's chunks. Raises
    ValueError with the upstream message when a chunk is an error."""
    head: dict | None = None
    usage, fingerprint = None, None
    choices: dict[int, dict] = {}
    for chunk in chunks:
        if "error" in chunk and "choices" not in chunk:
            error = chunk["error"]
            raise ValueError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        head = head or chunk
        usage = chunk.get("usage") or usage
        fingerprint = chunk.get("system_fingerprint") or fingerprint
        for c in chunk.get("choices") or ():
            got = choices.setdefault(c.get("index", 0), {"text": [], "reasoning": [], "role": None,
                                                          "finish_reason": None, "stop_reason": None})
            if chat:
                delta = c.get("delta") or {}
                got["role"] = got["role"] or delta.get("role")
                if delta.get("content"):
                    got["text"].append(delta["content"])
                if delta.get("reasoning"):
                    got["reasoning"].append(delta["reasoning"])
            elif c.get("text"):
                got["text"].append(c["text"])
            for key in ("finish_reason", "stop_reason"):
                if c.get(key) is not None:
                    got[key] = c[key]
    if head is None:
        raise ValueError("the stream ended before its first chunk")
    out_choices = []
    for index in sorted(choices):
        c = choices[index]
        text = "".join(c["text"])
        if chat:
            message = {"role": c["role"] or "assistant", "content": text}
            if c["reasoning"]:
                message["reasoning"] = "".join(c["reasoning"])
            out_choices.append({"index": index, "message": message, "logprobs": None,
                                "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]})
        else:
            out_choices.append({"index": index, "text": text, "logprobs": None,
                                "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]})
    return {"id": head.get("id"), "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created"), "model": head.get("model"), "choices": out_choices, "usage": usage,
            "system_fingerprint": fingerprint}
