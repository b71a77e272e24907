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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from common.config import ClusterSpec, Node, NodeType

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
    auth_token_path: str | None = None  # Ray token authentication: clients need this token (`use_auth`)
    redis_port: int | None = None  # GCS fault tolerance: the GCS's tables live in our redis-server on this port


def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


# Ports a node's agents take are picked from here up to the kernel's ephemeral range: a port the kernel can hand
# to any outgoing connection (binding to port 0 picks one of those) was taken by one between picking and the
# dashboard agent's bind, and the raylet died with its agent ("Address already in use", `make test`, 2026-12-07).
PORT_FLOOR = 20000  # above every fixed port the project's specs use (GCS, dashboard, Serve, Prometheus, Grafana)


def _ephemeral_low() -> int | None:
    """The first port of the kernel's ephemeral range (Linux), None where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports, below the kernel's ephemeral range where it leaves room (`PORT_FLOOR`), else
    any the kernel gives. The sockets are held open together: ports picked one at a time can repeat (a
    just-closed port is handed out again), which made `ray start` refuse two components on one port."""
    low = _ephemeral_low()
    span = range(PORT_FLOOR, low) if low is not None and low - PORT_FLOOR >= 1000 else None
    sockets = []
    try:
        for _ in range(100 * count):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", secrets.choice(span) if span else 0))
            except OSError:  # in use (or held by this call): another
                sock.close()
                continue
            sockets.append(sock)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"found only {len(sockets)} of {count} free ports in {span or 'the ephemeral range'}")
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


def system_binary(name: str, needed_for: str) -> str:
    """A Debian package's program (`make install` apt-installs them), found on PATH or in /usr/bin."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        raise RuntimeError(f"{name} is not installed ({needed_for}): `make install` installs Debian's {name} "
                           f"package (apt-get install {name}), or put a {name} binary on PATH")
    return path


def _write_private(path: Path, text: str) -> Path:
    """A new file readable by this user only from its first byte (secrets: tokens, passwords)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _new_auth_token(temp_dir: str) -> Path:
    """A fresh random token for Ray's token authentication, readable by this user only."""
    return _write_private(Path(temp_dir) / "auth_token", secrets.token_hex(32))


def _auth_env(token_path: Path | str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def use_auth(state: ClusterState) -> None:
    """Make this process (and the processes it starts) a client of the local cluster's token authentication:
    every Ray connection (GCS, dashboard, the Serve scale endpoint) must carry the cluster's token."""
    if not state.auth_token_path:
        return
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a token in the environment would win over the cluster's file
    os.environ.update(_auth_env(state.auth_token_path))
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")  # Ray caches the mode and the token per process
    AuthenticationTokenLoader.instance().reset_cache()


def _our_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line references our temp dir or our GCS (Ray's client server names only the GCS
    address, and `ray start` exits, so it is nobody's descendant: it used to outlive `down` on port 10001),
    plus all their descendants."""
    # The dir must end where a path component ends: /tmp/hsray must not match /tmp/hsray-e2e.
    alternatives = [re.escape(temp_dir.rstrip("/")) + r"(?=[/\s'\",]|$)"]
    state = read_state(temp_dir)
    if state is not None:
        port = state.address.rpartition(":")[2]
        alternatives.append(r"ray\.util\.client\.server .*--address=\S+:" + re.escape(port) + r"(?=\s|$)")
    pattern = re.compile("|".join(alternatives))
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


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


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


# What `ray start` (ray/_private/node.py) says when a raylet has not registered with the GCS within its fixed 30 s.
SLOW_REGISTRATION = "The current node timed out during startup"


def _raylet_logs(temp_dir: str, chars: int = 1500) -> str:
    logs = sorted(Path(temp_dir, "session_latest", "logs").glob("raylet*.err")) + sorted(
        Path(temp_dir, "session_latest", "logs").glob("raylet*.out"))
    return "\n".join(f"--- {p.name} (tail)\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


def _wait_for_nodes(address: str, expected: int, timeout_s: float, env: dict[str, str], temp_dir: str) -> None:
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
        raise RuntimeError(f"only {alive} of {expected} Ray nodes came up within {timeout_s}s: {out.stderr[-2000:]}\n"
                           f"{_raylet_logs(temp_dir)}")


# Ray's fake node provider: the head carries this id; the provider numbers the nodes it adds after it.
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
FAKE_PROVIDER_DEFAULTS = Path(__file__).with_name("fake_multi_node_defaults.yaml")


def _ensure_fake_provider_defaults() -> None:
    """Ray's autoscaler reads the fake provider's defaults from a package file that the PyPI wheels lack (it then
    dies with FileNotFoundError); put the project's copy there when it is missing."""
    import importlib.util

    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    target = ray_dir / "autoscaler" / "_private" / "fake_multi_node" / "example.yaml"
    if not target.exists():
        shutil.copyfile(FAKE_PROVIDER_DEFAULTS, target)


def autoscaling_config(spec: ClusterSpec, gcs_address: str) -> dict:
    """The cluster config of Ray's autoscaler (v2) with its fake multi-node provider: one node type per spec
    node type, with the node's labels and resources (the fake GPUs, CPU slots, object store), and one per spec
    node with exactly one node. Every accelerator node is then the autoscaler's own, as on KubeRay: v2 drops a
    `request_resources` whole when one bundle fits no node it manages, so a request for a service's whole shape
    would fail on nodes started beside it. The fake provider cannot set a node's `memory` (it passes resources
    as custom ones, and Ray refuses `memory` there)."""
    types = {"ray.head.default": {"resources": {"CPU": spec.head.num_cpus}, "node_config": {}, "max_workers": 0}}
    for t in [*spec.nodes, *spec.node_types]:
        count = (t.min_nodes, t.max_nodes) if isinstance(t, NodeType) else (1, 1)
        types[t.name] = {
            "resources": {"CPU": t.num_cpus, **t.resources(), "object_store_memory": t.object_store_memory_mb * 1024**2},
            "labels": t.labels(), "node_config": {}, "min_workers": count[0], "max_workers": count[1]}
    return {
        "cluster_name": "heteroscale-local", "max_workers": len(spec.nodes) + sum(t.max_nodes for t in spec.node_types),
        "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "available_node_types": types, "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "rsync_exclude": [], "rsync_filter": []}


def up(spec: ClusterSpec, temp_dir: str = DEFAULT_TEMP_DIR, progress=print) -> ClusterState:
    """Start the head and one Ray node per spec node; with `node_types`, the head also runs Ray's autoscaler
    (v2, fake multi-node provider) that adds labelled nodes of those types on demand. Idempotent: a running
    cluster is reused as is."""
    if is_running(temp_dir):
        state = read_state(temp_dir)
        progress(f"local cluster already running at {state.address} ({len(state.nodes)} nodes)")
        use_auth(state)
        return state
    total_gb = spec.total_memory_gb()
    machine_gb = psutil.virtual_memory().total / 1024**3
    if total_gb > machine_gb:
        raise ValueError(
            f"cluster spec asks for {total_gb:.1f} GiB of Ray memory but this machine has {machine_gb:.1f} GiB; "
            "lower memory_gb of the head or nodes"
        )
    down(temp_dir, progress=lambda *_: None)  # leftovers of a crashed run
    try:
        return _start(spec, temp_dir, progress)
    except BaseException:
        # A node that failed to start (e.g. a port taken between picking and binding) must not leave the head
        # and the other nodes running: a later caller would find a half cluster, or ports still held.
        progress("local cluster failed to start; stopping what did start")
        down(temp_dir, progress=lambda *_: None)
        raise


def _start(spec: ClusterSpec, temp_dir: str, progress) -> ClusterState:
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token authentication: only holders of this cluster's token reach its GCS, dashboard and REST endpoints
    # (the Serve scale endpoint included), not anything that can open a port on this machine.
    token_path = _new_auth_token(temp_dir)
    env.update(_auth_env(token_path))
    head = spec.head
    address = f"127.0.0.1:{head.gcs_port}"
    head_env, head_args, autoscaling = env, [], []
    if head.redis_port is not None:
        password = _start_redis(temp_dir, head.redis_port)
        progress(f"GCS fault tolerance: the GCS keeps its tables in redis-server at 127.0.0.1:{head.redis_port}")
        head_env = {**env, "RAY_REDIS_ADDRESS": f"127.0.0.1:{head.redis_port}"}
        head_args = [f"--redis-password={password}"]
    progress(f"starting Ray head at {address} (dashboard :{head.dashboard_port})")
    if spec.node_types:
        _ensure_fake_provider_defaults()
        config_path = Path(temp_dir) / "autoscaling-config.json"
        config_path.write_text(json.dumps(autoscaling_config(spec, address)))
        autoscaling = [f"--autoscaling-config={config_path}"]
        head_env = {**head_env, "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "2",
                    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        for t in spec.node_types:
            progress(f"  ~ node type {t.name}: {t.num_gpus}x {t.gpu_type}, S1={t.s1}, S2={t.s2}, "
                     f"{t.min_nodes}-{t.max_nodes} nodes on demand (Ray autoscaler v2, fake provider)")
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
            *head_args,
            *autoscaling,
        ],
        head_env,
    )
    state = ClusterState(address=address, dashboard_url=f"http://127.0.0.1:{head.dashboard_port}",
                         temp_dir=temp_dir, nodes=(), started_at=time.time(), auth_token_path=str(token_path),
                         redis_port=head.redis_port)
    # Written now (and again when every node is up), so a `down` after a failed start finds what the head started.
    _state_path(temp_dir).write_text(json.dumps(asdict(state)))
    for node in spec.nodes:
        progress(f"  + node {node.name}: {node.num_gpus}x {node.gpu_type}, S1={node.s1}, S2={node.s2}"
                 + (" (started by the autoscaler)" if spec.node_types else ""))
        if spec.node_types:
            continue  # the autoscaler starts it (a node type of its own, min = max = 1)
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
                if SLOW_REGISTRATION in str(err):
                    # `ray start` gives a raylet a fixed 30 s to register with the GCS, then exits 1 with the raylet
                    # still starting; on a loaded machine it registers later. The wait below decides, with the
                    # raylet's log in its error when it never does.
                    progress(f"    {node.name}: its raylet took over 30 s to register; waiting for it")
                    break
                if attempt == 2 or "port" not in str(err):
                    raise
                progress(f"    port clash starting {node.name}; retrying with other ports")
    _wait_for_nodes(address, 1 + len(spec.nodes) + sum(t.min_nodes for t in spec.node_types), 120, env, temp_dir)
    state = replace(state, nodes=tuple(n.name for n in spec.nodes), started_at=time.time())
    _state_path(temp_dir).write_text(json.dumps(asdict(state)))
    use_auth(state)
    progress(f"local cluster up: RAY_ADDRESS={address} (token authentication: RAY_AUTH_MODE=token "
             f"RAY_AUTH_TOKEN_PATH={token_path})")
    return state


def _wait_for_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer on 127.0.0.1:{port} within {timeout_s:.0f}s: {err}") from None
            time.sleep(0.2)


def _start_redis(temp_dir: str, port: int) -> str:
    """A private redis-server for the GCS's tables: loopback only, a fresh password, no persistence (the cluster
    lives no longer than it). Its process title names its config file under `temp_dir`, so `down` stops it with
    the rest. Returns the password."""
    binary = system_binary("redis-server", "head.redis_port asks for GCS fault tolerance")
    password = secrets.token_hex(24)
    conf = _write_private(Path(temp_dir) / "redis.conf", "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f"requirepass {password}", 'save ""',
        "appendonly no", f"dir {temp_dir}", f"logfile {temp_dir}/redis.log", "daemonize yes",
        f"pidfile {temp_dir}/redis.pid", 'proc-title-template "{title} {listen-addr} {config-file}"', ""]))
    _run([binary, str(conf)], dict(os.environ))
    _wait_for_port(port, 10, "redis-server")
    return password


def restart_gcs(temp_dir: str = DEFAULT_TEMP_DIR, timeout_s: float = 60.0, progress=print) -> float:
    """Kill the head's GCS server and start it again with the same command line (what a head-pod restart does
    to the GCS on KubeRay). Needs GCS fault tolerance (`head.redis_port`): the restarted GCS reloads its tables
    from Redis and the raylets, actors and Serve reconnect to it. Returns the seconds until it answers again."""
    state = read_state(temp_dir)
    if state is None:
        raise RuntimeError(f"no local cluster in {temp_dir}")
    if state.redis_port is None:
        raise ValueError(f"the cluster in {temp_dir} runs without GCS fault tolerance (head.redis_port unset): a "
                         "restarted GCS would start empty and the nodes would not rejoin it")
    gcs = [p for p in _our_processes(temp_dir) if _name(p) == "gcs_server"]
    if len(gcs) != 1:
        raise RuntimeError(f"expected one GCS server of the cluster in {temp_dir}, found {len(gcs)}")
    proc = gcs[0]
    cmdline, env, cwd = proc.cmdline(), proc.environ(), proc.cwd()
    started = time.monotonic()
    proc.kill()
    proc.wait(10)
    progress(f"GCS server (pid {proc.pid}) killed; starting it again")
    subprocess.Popen(cmdline, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_port(int(state.address.rpartition(":")[2]), timeout_s, "the restarted GCS server")
    took = time.monotonic() - started
    progress(f"GCS server answers again after {took:.1f}s")
    return took


def down(temp_dir: str = DEFAULT_TEMP_DIR, timeout_s: float = 20.0, progress=print) -> int:
    """Stop every process of the cluster started by `up` with this temp dir. Returns how many were stopped.
    In three waves: everything but the GCS and Redis, then the GCS, then Redis. Signalled all at once, the GCS
    server and Ray's autoscaler monitor outlived SIGTERM for the whole 20 s (then SIGKILL); in waves the cluster
    is gone in ~4 s."""
    procs = _safe(_our_processes(temp_dir))

    def wave(proc: psutil.Process) -> int:
        return {"gcs_server": 1, "redis-server": 2}.get(_name(proc), 0)

    for rank in range(3):
        batch = [p for p in procs if wave(p) == rank]
        for proc in batch:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(batch, timeout=timeout_s)
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
