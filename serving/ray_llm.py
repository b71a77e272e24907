"""The one door to Ray Serve LLM's and Serve's private API (Ray 2.60 keeps its P/D pattern, the OpenAI ingress
and their models under `ray.llm._internal`). Every private name the serving layer uses is listed here and
imported on first use (PEP 562), so the ingress never imports what only the engines need (vLLM) and an
upgrade that moves or drops one fails in one place: `tests/integration/test_upstream_contract.py` imports
each name and checks the signatures we call, and `tests/unit/test_private_apis.py` fails when a module
outside this one imports a private API. Public equivalents are used wherever 2.60 has one
(`ray.serve.llm.build_llm_deployment`).
"""

from __future__ import annotations

import importlib
from typing import Any

_LLM = "ray.llm._internal"
# our name -> (module, its name there): the same name unless upstream's starts with `_`
PRIVATE: dict[str, str | tuple[str, str]] = {
    # the P/D servers the engines subclass (`serving.engines`), and the prompt-id reuse patch they apply
    "LLMServer": f"{_LLM}.serve.core.server.llm_server",
    "PDDecodeServer": f"{_LLM}.serve.serving_patterns.prefill_decode.pd_server",
    "PDPrefillServer": f"{_LLM}.serve.serving_patterns.prefill_decode.pd_server",
    "reuse_prompt_token_ids": f"{_LLM}.common.patches.vllm.tokenize_once",
    # OpenAI request/response models
    "ChatCompletionRequest": f"{_LLM}.serve.core.configs.openai_api_models",
    "CompletionRequest": f"{_LLM}.serve.core.configs.openai_api_models",
    "ErrorInfo": f"{_LLM}.serve.core.configs.openai_api_models",
    "ErrorResponse": f"{_LLM}.serve.core.configs.openai_api_models",
    "ModelCard": f"{_LLM}.serve.core.configs.openai_api_models",
    "OpenAIHTTPException": f"{_LLM}.serve.core.configs.openai_api_models",
    "to_model_metadata": f"{_LLM}.serve.core.configs.openai_api_models",
    # the OpenAI ingress the project's ingress extends (`serving.ingress`)
    "OpenAiIngress": f"{_LLM}.serve.core.ingress.ingress",
    "init": f"{_LLM}.serve.core.ingress.ingress",
    "make_fastapi_ingress": f"{_LLM}.serve.core.ingress.ingress",
    "NON_STREAMING_RESPONSE_TYPES": f"{_LLM}.serve.core.ingress.utils",
    "openai_json_wrapper": (f"{_LLM}.serve.core.ingress.utils", "_openai_json_wrapper"),
    "peek_at_generator": (f"{_LLM}.serve.core.ingress.utils", "_peek_at_generator"),
    "sanitize_chat_completion_request": (f"{_LLM}.serve.core.ingress.utils", "_sanitize_chat_completion_request"),
    "RawRequestInfo": f"{_LLM}.serve.core.protocol",
    # Serve: the session-affinity header (its name is configurable by env var) and a non-blocking run
    "session_id_from_headers": "ray.serve._private.http_util",
    # the namespace Serve's replicas are named in (a replica's runtime context reports its job's, not this)
    "SERVE_NAMESPACE": "ray.serve._private.constants",
    "run_app": ("ray.serve.api", "_run"),
}
# Upstream private members the engines override or call on their base classes (checked by the contract test)
MEMBERS: dict[str, tuple[str, ...]] = {
    "PDDecodeServer": ("_pd_handle_request", "_get_connector_backend", "_request_prefill_token_ids"),
    "LLMServer": (),  # `_llm_config` and PDDecodeServer's `_prefill_handle` are set in their __init__
}


def where(name: str) -> tuple[str, str]:
    """(module, upstream name) of one of our names."""
    spec = PRIVATE[name]
    return spec if isinstance(spec, tuple) else (spec, name)


def __getattr__(name: str) -> Any:
    if name not in PRIVATE:
        raise AttributeError(f"serving.ray_llm has no {name!r}: add it to PRIVATE (after review) to use it")
    module, upstream = where(name)
    value = getattr(importlib.import_module(module), upstream)
    globals()[name] = value
    return value
