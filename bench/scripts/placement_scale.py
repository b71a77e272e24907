"""One scheduling cycle at fleet scale: 100 deployment-group requests over a synthetic 20,000-GPU tree.

Tree: 2,500 nodes x 8 GPUs, 12 S2 big-pods, 125 S1 mini-pods, 3 GPU types (H20, L20, A100), mixing
S2-homogeneous, S2-heterogeneous and S1-heterogeneous subgroups; 30 % of GPUs already in use. Requests: 100
services (S1, S2 and cluster affinity; P:D batches of 1:3 to 4:12). Reports the cycle time p50/p99 over repeats
(tree rebuilt each time, as every real cycle does), and as the in-run baseline the cost of building the tree
alone. Writes bench/results/placement_scale.json. Target: p50 <= 100 ms on the 2-core build machine.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402
from placement.scheduler import ScaleRequest, ServiceShape, place  # noqa: E402
from common.vocab import NodeInfo, Scope  # noqa: E402
from placement.topology import build_tree  # noqa: E402

REPEATS = 15


def synthetic_nodes(seed: int = 0) -> list[NodeInfo]:
    rng = random.Random(seed)
    nodes = []
    node_id = 0
    for s2 in range(12):
        kind = ("homo", "hetero-s2", "hetero-s1")[s2 % 3]
        for s1 in range(125 // 12 + (1 if s2 < 125 % 12 else 0)):
            for i in range(20):
                if kind == "homo":
                    gpu = ("H20", "L20", "A100")[s2 // 3 % 3]
                elif kind == "hetero-s2":
                    gpu = ("H20", "L20", "A100")[s1 % 3]
                else:
                    gpu = ("H20", "L20")[i % 2]
                used = rng.choice([0, 0, 2, 4, 8]) if rng.random() < 0.45 else 0
                nodes.append(NodeInfo(f"n{node_id}", gpu, 8, 8 - used, f"s2-{s2}-s1-{s1}", f"s2-{s2}"))
                node_id += 1
    return nodes[:2500]


def synthetic_requests(seed: int = 1) -> list[ScaleRequest]:
    rng = random.Random(seed)
    requests = []
    for k in range(100):
        affinity = rng.choice([Scope.S1, Scope.S1, Scope.S2, Scope.CLUSTER])
        prefill = tuple(rng.sample(["L20", "H20", "A100"], 2))
        decode = tuple(rng.sample(["H20", "L20", "A100"], 2))
        size = rng.randint(1, 4)
        requests.append(ScaleRequest(ServiceShape(f"svc-{k:03d}", prefill, decode, affinity=affinity,
                                                  priority=rng.randint(0, 5)), size, 3 * size))
    return requests


def main() -> int:
    nodes, requests = synthetic_nodes(), synthetic_requests()
    cycle, build_only, placed = [], [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        build_tree(nodes)
        build_only.append(time.perf_counter() - start)
        start = time.perf_counter()
        plan = place(build_tree(nodes), requests)
        cycle.append(time.perf_counter() - start)
        placed = plan
    tree = build_tree(nodes)
    result = {
        "nodes": len(nodes), "gpus": sum(n.total_gpus for n in nodes),
        "s2_domains": len(tree.domains_at(Scope.S2)), "s1_domains": len(tree.domains_at(Scope.S1)),
        "gpu_types": sorted({n.gpu_type for n in nodes}), "requests": len(requests), "repeats": REPEATS,
        "cycle_p50_ms": round(statistics.median(cycle) * 1000, 2),
        "cycle_p99_ms": round(max(cycle) * 1000, 2),
        "build_tree_only_p50_ms": round(statistics.median(build_only) * 1000, 2),
        "actions": len(placed.actions), "unplaced": len(placed.unplaced),
        "target_p50_ms": 100, "meets_target": statistics.median(cycle) * 1000 <= 100,
    }
    write_result("placement_scale", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
