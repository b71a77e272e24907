"""Start and stop a labelled multi-node Ray cluster on one machine (`heteroscale up` / `heteroscale down`).

Every node is a `ray start` process tree with the node's labels and fake-GPU custom resources, all sharing one
private temp dir. `down` stops exactly the processes that reference that temp dir (and their children, e.g.
vLLM engine cores), so a user's own Ray cluster on the same machine is never touched. Imports Ray only through
the `ray` CLI of the same environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from common.config import ClusterSpec, Node

logger = logging.getLogger(__name__)

DEFAULT_TEMP_DIR = "/tmp/hsray"  # short: Ray puts unix sockets under it (108-byte path limit)
STATE_FILE = "heteroscale-cluster.json"


@dataclass(frozen=True)
class ClusterState:
    address: str  # GCS address, what RAY_ADDRESS takes
    dashboard_url: str
    temp_dir: str
    nodes: tuple[str, ...]
    started_at: float


def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports. The sockets are held open together: ports picked one at a time can repeat
    (a just-closed port is handed out again), which made `ray start` refuse two components on one port."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _gb(value: float) -> int:
    return int(value * 1024**3)


def _state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def read_state(temp_dir: str = DEFAULT_TEMP_DIR) -> ClusterState | None:
    path = _state_path(temp_dir)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["nodes"] = tuple(data["nodes"])
    return ClusterState(**data)


def _our_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line references our temp dir, plus all their descendants."""
    # The dir must end where a path component ends: /tmp/hsray must not match /tmp/hsray-e2e.
    pattern = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=[/\s'\",]|$)")
    roots: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if pattern.search(cmdline) and proc.pid != os.getpid():
            roots[proc.pid] = proc
    found = dict(roots)
    for proc in list(roots.values()):
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def is_running(temp_dir: str = DEFAULT_TEMP_DIR) -> bool:
    state = read_state(temp_dir)
    if state is None:
        return False
    return any("gcs_server" in " ".join(p.cmdline()) for p in _safe(_our_processes(temp_dir)))


def _safe(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            proc.cmdline()
            alive.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return alive


def _run(cmd: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd[:3])} ...` failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n"
            f"{result.stderr[-4000:]}"
        )


def _node_args(node: Node) -> list[str]:
    return [
        f"--num-cpus={node.num_cpus}",
        f"--memory={_gb(node.memory_gb)}",
        f"--object-store-memory={node.object_store_memory_mb * 1024**2}",
        f"--resources={json.dumps(node.resources())}",
        f"--labels={','.join(f'{k}={v}' for k, v in node.labels().items())}",
    ]


def _wait_for_nodes(address: str, expected: int, timeout_s: float, env: dict[str, str]) -> None:
    code = (
        "import ray,sys,time\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline=time.time()+{timeout_s}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {expected} and time.time() < deadline: time.sleep(0.5)\n"
        "print(sum(n['Alive'] for n in ray.nodes()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    alive = int((out.stdout.strip().splitlines() or ["0"])[-1]) if out.returncode == 0 else -1
    if alive < expected:
        raise RuntimeError(f"only {alive} of {expected} Ray nodes came up within {timeout_s}s: {out.stderr[-2000:]}")


def up(spec: ClusterSpec, temp_dir: str = DEFAULT_TEMP_DIR, progress=print) -> ClusterState:
    """Start the head and one Ray node per spec node. Idempotent: a running cluster is reused as is."""
    if is_running(temp_dir):
        state = read_state(temp_dir)
        progress(f"local cluster already running at {state.address} ({len(state.nodes)} nodes)")
        return state
    total_gb = spec.total_memory_gb()
    machine_gb = psutil.virtual_memory().total / 1024**3
    if total_gb > machine_gb:
        raise ValueError(
            f"cluster spec asks for {total_gb:.1f} GiB of Ray memory but this machine has {machine_gb:.1f} GiB; "
            "lower memory_gb of the head or nodes"
        )
    down(temp_dir, progress=lambda *_: None)  # leftovers of a crashed run
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    head = spec.head
    address = f"127.0.0.1:{head.gcs_port}"
    progress(f"starting Ray head at {address} (dashboard :{head.dashboard_port})")
    _run(
        [
            _ray_cli(), "start", "--head",
            f"--port={head.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={head.num_cpus}",
            f"--memory={_gb(head.memory_gb)}",
            f"--object-store-memory={head.object_store_memory_mb * 1024**2}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={head.dashboard_port}",
            "--disable-usage-stats",
            f"--labels={'heteroscale.io/node'}=head",
        ],
        env,
    )
    for node in spec.nodes:
        progress(f"  + node {node.name}: {node.num_gpus}x {node.gpu_type}, S1={node.s1}, S2={node.s2}")
        for attempt in (1, 2):  # a port can still be taken between picking and binding: retry once
            agent_http, agent_grpc, runtime_env, metrics = _free_ports(4)
            try:
                _run(
                    [
                        _ray_cli(), "start",
                        f"--address={address}",
                        "--node-ip-address=127.0.0.1",
                        f"--temp-dir={temp_dir}",
                        f"--dashboard-agent-listen-port={agent_http}",
                        f"--dashboard-agent-grpc-port={agent_grpc}",
                        f"--runtime-env-agent-port={runtime_env}",
                        f"--metrics-export-port={metrics}",
                        "--include-log-monitor=false",
                        "--disable-usage-stats",
                        *_node_args(node),
                    ],
                    env,
                )
                break
            except RuntimeError as err:
                if attempt == 2 or "port" not in str(err):
                    raise
                progress(f"    port clash starting {node.name}; retrying with other ports")
    _wait_for_nodes(address, 1 + len(spec.nodes), 60, env)
    state = ClusterState(
        address=address,
        dashboard_url=f"http://127.0.0.1:{head.dashboard_port}",
        temp_dir=temp_dir,
        nodes=tuple(n.name for n in spec.nodes),
        started_at=time.time(),
    )
    _state_path(temp_dir).write_text(json.dumps(asdict(state)))
    progress(f"local cluster up: RAY_ADDRESS={address}")
    return state


def down(temp_dir: str = DEFAULT_TEMP_DIR, timeout_s: float = 20.0, progress=print) -> int:
    """Stop every process of the cluster started by `up` with this temp dir. Returns how many were stopped."""
    procs = _safe(_our_processes(temp_dir))
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    state = _state_path(temp_dir)
    if state.exists():
        state.unlink()
    if procs:
        progress(f"local cluster down: stopped {len(procs)} processes")
    else:
        progress("no local cluster running")
    return len(procs)
