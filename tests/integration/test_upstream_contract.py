"""The private Ray APIs the project uses, against the pinned Ray (issue 21): every name `serving/ray_llm.py`
lists imports from where it says, the upstream members the engines override or call exist with the
parameters we pass, and the other reviewed private calls (`tests/unit/test_private_apis.py`) keep their
signatures. An upgrade that moves or changes one fails here, by name, instead of in a running replica.
(Integration tier: importing Ray Serve LLM's P/D servers imports vLLM.)"""

from __future__ import annotations

import importlib
import inspect

import pytest

from serving import ray_llm


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", sorted(ray_llm.PRIVATE))
def test_every_private_name_of_the_adapter_imports_from_where_it_says(name):
    path, upstream = ray_llm.where(name)
    module = importlib.import_module(path)
    assert hasattr(module, upstream), f"{path} no longer has {upstream}"
    assert getattr(ray_llm, name) is getattr(module, upstream)


def test_the_upstream_members_the_engines_override_or_call_keep_their_signatures():
    decode = ray_llm.PDDecodeServer
    for cls_name, members in ray_llm.MEMBERS.items():
        cls = getattr(ray_llm, cls_name)
        missing = [m for m in members if not callable(getattr(cls, m, None))]
        assert not missing, f"{cls_name} lost {missing}"
    assert params(decode._pd_handle_request) == ["self", "request", "raw_request_info"]
    assert params(decode._get_connector_backend) == ["self"]
    assert params(decode._request_prefill_token_ids) == ["self", "prefill_request"]
    assert "self._prefill_handle =" in inspect.getsource(decode)  # read by serving.engines.DecodeServer
    assert "self._llm_config =" in inspect.getsource(ray_llm.LLMServer)  # read by both engine servers
    assert {"_blocking", "name", "route_prefix"} <= set(params(ray_llm.run_app))
    assert params(ray_llm.session_id_from_headers) == ["headers"]


def test_the_other_reviewed_private_calls_keep_their_signatures():
    from ray._private import state
    from ray.experimental import internal_kv
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.controller import ServeController
    from ray.serve.context import _get_global_client

    for name in ("get", "del", "list", "exists"):
        fn = getattr(internal_kv, f"_internal_kv_{name}")
        assert params(fn)[0] in ("key", "prefix") and "namespace" in params(fn), name
    assert params(internal_kv._internal_kv_put)[:3] == ["key", "value", "overwrite"]
    assert callable(state.available_resources_per_node)
    assert params(DeploymentID)[:2] == ["name", "app_name"]
    assert params(ServeController.update_deployment_replicas)[:3] == ["self", "deployment_id", "target_num_replicas"]
    assert callable(ServeController.get_serve_instance_details)
    assert "self._controller" in inspect.getsource(ServeControllerClient.__init__)  # autoscaler.serve_client reads it
    assert params(_get_global_client) == [] or all(
        p.default is not inspect.Parameter.empty for p in inspect.signature(_get_global_client).parameters.values())
