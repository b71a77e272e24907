"""Private APIs stay where they are reviewed (issue 21): every import of a private Ray or vLLM module or name,
and every private attribute read off one, is listed here per file. The serving layer reaches Ray Serve LLM's
private API only through `serving/ray_llm.py` (whose names the integration tier's upstream contract test
imports and checks). A new private use fails this test until it is reviewed and added below (or, better,
replaced by a public equivalent)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("autoscaler", "serving", "placement", "heteroscale_ray", "common", "bench")
KV = "ray.experimental.internal_kv._internal_kv_"
ALLOWED = {
    # Serve's external scaling call and bounded instance details (the REST endpoint needs the dashboard); the
    # controller's saved state and the created groups' records (Ray's internal KV has no public API)
    "autoscaler/serve_client.py": {"ray.serve._private.common.DeploymentID", "ray.serve.context._get_global_client",
                                   KV + "get", KV + "put", KV + "del", KV + "list"},
    # free GPUs per node and the node-supply parts shared by the services' controllers
    "placement/ray_adapter.py": {"ray._private.state", KV + "get", KV + "put", KV + "del", KV + "list",
                                 KV + "exists"},
    # token authentication of the local cluster
    "heteroscale_ray/local_cluster.py": {"ray._raylet.AuthenticationTokenLoader", "ray._raylet.Config"},
    # benchmark scripts (not the product)
    "bench/scripts/live_vs_serve_autoscaling.py": {"ray.serve.context._get_global_client"},
    "bench/scripts/router_overhead.py": {
        "ray.llm._internal.serve.core.configs.openai_api_models.CompletionRequest",
        "ray.llm._internal.serve.engines.vllm.kv_transfer.base.base_prefill_kv_transfer_params"},
}


def _private(module: str, name: str = "") -> bool:
    parts = module.split(".")
    return parts[0] in ("ray", "vllm") and (any(p.startswith("_") for p in parts) or
                                             (name.startswith("_") and not name.startswith("__")))


def private_uses(source: str) -> set[str]:
    """Private Ray/vLLM modules and names a module imports, and private attributes read off them."""
    tree = ast.parse(source)
    found, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if _private(node.module, a.name):
                    found.add(f"{node.module}.{a.name}")
                if node.module.split(".")[0] in ("ray", "vllm"):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _private(a.name):
                    found.add(a.name)
                if a.name.split(".")[0] in ("ray", "vllm"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.add(".".join([aliases[base.id], *reversed(chain)]))
    return found


def test_private_ray_and_vllm_apis_are_used_only_where_reviewed():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            uses = private_uses(path.read_text())
            if uses:
                found[str(path.relative_to(ROOT))] = uses
    new = {f: sorted(u - ALLOWED.get(f, set())) for f, u in found.items() if u - ALLOWED.get(f, set())}
    assert not new, f"private APIs used outside the reviewed list (use serving/ray_llm.py or add them): {new}"
    gone = {f: sorted(a - found.get(f, set())) for f, a in ALLOWED.items() if a - found.get(f, set())}
    assert not gone, f"listed but no longer used (remove them from ALLOWED): {gone}"


def test_the_scan_sees_a_private_import_and_attribute():
    source = ("from ray.serve._private.constants import SERVE_NAMESPACE\n"
              "from ray.experimental import internal_kv\n"
              "import ray\n"
              "internal_kv._internal_kv_get(b'k')\nray._private.worker\nfrom ray import serve\nserve.run\n")
    assert private_uses(source) == {"ray.serve._private.constants.SERVE_NAMESPACE",
                                    "ray.experimental.internal_kv._internal_kv_get", "ray._private"}
