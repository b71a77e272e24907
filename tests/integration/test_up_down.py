"""`heteroscale down` leaves nothing of ours running and no port held, twice in a row (Ray's client server on
port 10001 used to outlive it: `ray start` exits, so the server was nobody's descendant); and the local cluster
runs with Ray's token authentication: the dashboard's REST scale endpoint refuses a call without the token."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

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


def _scale(dashboard_url: str, headers: dict) -> httpx.Response:
    url = f"{dashboard_url}/api/v1/applications/svc/deployments/svc--dg-a--decode/scale"
    deadline = time.monotonic() + 60
    while True:  # the dashboard starts a little after the GCS
        try:
            return httpx.post(url, json={"target_num_replicas": 5}, headers=headers, timeout=10)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_up_then_down_twice_leaves_no_process_and_no_port():
    for i in range(2):
        state = local_cluster.up(SPEC, temp_dir=TEMP_DIR, progress=lambda *_: None)
        if i == 0:
            refused = _scale(state.dashboard_url, {})
            assert refused.status_code in (401, 403), (refused.status_code, refused.text[:300])
            token = Path(state.auth_token_path).read_text().strip()
            assert oct(Path(state.auth_token_path).stat().st_mode & 0o777) == "0o600"
            allowed = _scale(state.dashboard_url, {"Authorization": f"Bearer {token}"})
            assert allowed.status_code not in (401, 403), allowed.text[:300]  # past auth: no such application
            with pytest.raises(ValueError, match="without GCS fault tolerance"):  # no Redis: refused, GCS untouched
                local_cluster.restart_gcs(TEMP_DIR)
        ours = {p.pid for p in local_cluster._our_processes(TEMP_DIR)}
        ports = _listening(ours)
        assert {SPEC.head.gcs_port, SPEC.head.dashboard_port, 10001} <= ports  # 10001: Ray's client server
        assert local_cluster.down(TEMP_DIR, progress=lambda *_: None) >= len(ours)
        left = [p.pid for p in psutil.process_iter() if _mentions_us(p)]
        assert not left, [" ".join(psutil.Process(pid).cmdline())[:200] for pid in left if psutil.pid_exists(pid)]
        held = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"} & ports
        assert not held, held
        assert not local_cluster.is_running(TEMP_DIR)


def test_a_node_that_fails_to_start_leaves_nothing_running(monkeypatch):
    """The head starts, the worker node's `ray start` fails (in CI: a port taken between picking and binding,
    twice): `up` raises and stops the head it started, so the next `up` and other clusters find no leftovers."""
    real_run = local_cluster._run

    def run(cmd, env):
        if "--head" not in cmd:
            raise RuntimeError("ray start failed: simulated node failure (not a port clash, so no retry)")
        real_run(cmd, env)

    monkeypatch.setattr(local_cluster, "_run", run)
    said = []
    with pytest.raises(RuntimeError, match="simulated node failure"):
        local_cluster.up(SPEC, temp_dir=TEMP_DIR, progress=said.append)
    assert any("starting Ray head" in line for line in said)  # the head did start before the node failed
    assert "failed to start; stopping what did start" in said[-1]
    assert not local_cluster.is_running(TEMP_DIR)
    assert not [p.pid for p in psutil.process_iter() if _mentions_us(p)]


def test_a_raylet_slower_than_ray_starts_30_s_still_joins(monkeypatch):
    """CI, a loaded machine: the worker's `ray start` gave up after its fixed 30 s while its raylet was still
    registering. `up` waits for the node instead of failing, and the cluster comes up whole."""
    real_run = local_cluster._run

    def run(cmd, env):
        real_run(cmd, env)  # the node really starts ...
        if "--head" not in cmd:  # ... and `ray start` reports what it says when registration is slow
            raise RuntimeError(f"`ray start` failed (exit 1):\nException: {local_cluster.SLOW_REGISTRATION}. ...")

    monkeypatch.setattr(local_cluster, "_run", run)
    said = []
    try:
        state = local_cluster.up(SPEC, temp_dir=TEMP_DIR, progress=said.append)
        assert state.nodes == ("n1",)
        assert any("took over 30 s to register" in line for line in said)
    finally:
        local_cluster.down(TEMP_DIR, progress=lambda *_: None)
    assert not local_cluster.is_running(TEMP_DIR)
