"""The OpenAI-style HTTP pieces of the ingress (`serving.ingress`): error bodies, the request-body check that
answers a bad body with a 4xx naming the field before the request models see it, and the idle-timeout wrapper
that ends a stalled or failed stream with an error event."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncGenerator, Mapping

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


def error(code: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(status_code=code, headers=dict(headers) if headers else None,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


async def body_error(request: Request, model) -> JSONResponse | None:
    """The 4xx answer for a bad inference body, or None when `model` accepts it."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return error(415, f"unsupported content type {media!r}: send the body as application/json")
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        return error(400, f"the body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return error(400, f"the body must be a JSON object, got {type(data).__name__}")
    nulls = sorted(k for k, v in data.items() if v is None and k in model.model_fields
                   and model.model_fields[k].is_required())
    if nulls:
        return error(400, f"invalid request: {nulls[0]}: a required field may not be null", param=nulls[0])
    try:
        model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        return error(400, f"invalid request: {field or 'body'}: {first.get('msg', exc)}", param=field)
    except Exception as exc:  # a validator that assumed a type: the client's input is wrong, not the server
        return error(400, f"invalid request body: {type(exc).__name__}: {exc}")
    return None


async def with_idle_timeout(gen: AsyncGenerator, idle_timeout_s: float) -> AsyncGenerator:
    """Re-yield `gen`, ending with an SSE error event if no chunk arrives for `idle_timeout_s`, or if the stream
    fails (e.g. the decode replica serving it died): the client gets an error event and the end of the stream,
    never a connection cut without a word or a stream that hangs."""
    iterator = gen.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            logger.warning("stream idle for more than %.1fs; closing it", idle_timeout_s)
            await iterator.aclose()
            yield ('data: {"error": {"message": "stream idle timeout", "type": "timeout", "code": 504}}\n\n')
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("stream failed after it started: %s: %s", type(exc).__name__, str(exc)[:200])
            error = {"error": {"message": f"the stream failed: {type(exc).__name__}", "type": "server_error",
                               "code": 502}}
            yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk
