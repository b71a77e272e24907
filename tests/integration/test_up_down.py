"""`heteroscale down` leaves nothing of ours running and no port held, twice in a row (Ray's client server on
port 10001 used to outlive it: `ray start` exits, so the server was nobody's descendant)."""

from __future__ import annotations

import psutil

from common.config import parse_cluster_spec
from heteroscale_ray import local_cluster

TEMP_DIR = "/tmp/hsray-updown"
SPEC = parse_cluster_spec({
    "head": {"num_cpus": 0, "memory_gb": 1, "gcs_port": 6405, "dashboard_port": 8287},
    "nodes": [{"name": "n1", "gpu_type": "L20", "num_gpus": 1, "s1": "s1-a", "s2": "s2-0", "memory_gb": 1}],
})


def _listening(pids: set[int]) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids}


def _mentions_us(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return TEMP_DIR in cmdline or f":{SPEC.head.gcs_port}" in cmdline


def test_up_then_down_twice_leaves_no_process_and_no_port():
    for _ in range(2):
        local_cluster.up(SPEC, temp_dir=TEMP_DIR, progress=lambda *_: None)
        ours = {p.pid for p in local_cluster._our_processes(TEMP_DIR)}
        ports = _listening(ours)
        assert {SPEC.head.gcs_port, SPEC.head.dashboard_port, 10001} <= ports  # 10001: Ray's client server
        assert local_cluster.down(TEMP_DIR, progress=lambda *_: None) >= len(ours)
        left = [p.pid for p in psutil.process_iter() if _mentions_us(p)]
        assert not left, [" ".join(psutil.Process(pid).cmdline())[:200] for pid in left if psutil.pid_exists(pid)]
        held = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"} & ports
        assert not held, held
        assert not local_cluster.is_running(TEMP_DIR)
