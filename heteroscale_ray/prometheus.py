"""A real Prometheus server for the local labelled cluster (`heteroscale up --prometheus`).

It listens on loopback only and scrapes every Ray node's metrics export endpoint (the service-discovery file
Ray keeps in its temp dir: new nodes are picked up without a restart) and the ingress's `/metrics`. Its config
and data live under the cluster's temp dir, so `heteroscale down` stops it with the rest. The binary is
Debian's `prometheus` package, which `make install` installs (apt-get); on a real cluster add the two scrape
jobs of `scrape_config()` to your own Prometheus instead (see README, "Metrics").
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from heteroscale_ray.local_cluster import system_binary

DEFAULT_PORT = 9390  # not 9090: a system Prometheus (the Debian package starts one where it can) may hold it
SCRAPE_INTERVAL_S = 5
RAY_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray writes it in its temp dir


def scrape_config(temp_dir: str, ingress_targets: list[str], interval_s: int = SCRAPE_INTERVAL_S) -> str:
    """prometheus.yml: Ray's nodes (file service discovery) and the ingress's `/metrics`."""
    config = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "scrape_configs": [
            {"job_name": "ray", "file_sd_configs": [{"files": [str(Path(temp_dir) / RAY_DISCOVERY_FILE)]}]},
            {"job_name": "heteroscale-ingress", "metrics_path": "/metrics",
             "static_configs": [{"targets": list(ingress_targets)}]},
        ],
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def start(temp_dir: str, ingress_targets: list[str], port: int = DEFAULT_PORT, progress=print,
          timeout_s: float = 30.0) -> str:
    """Start Prometheus on 127.0.0.1:`port` (reused if one of ours already answers there); returns its URL."""
    url = f"http://127.0.0.1:{port}"
    root = Path(temp_dir) / "prometheus"
    if _ready(url) and (root / "prometheus.yml").exists():
        progress(f"prometheus already running at {url}")
        return url
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(scrape_config(temp_dir, ingress_targets))
    log = open(root / "prometheus.log", "ab")
    subprocess.Popen([system_binary("prometheus", "heteroscale up --prometheus"), f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                      f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
                     stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _ready(url):
            progress(f"prometheus up at {url} (scraping Ray's nodes and the ingress at {', '.join(ingress_targets)})")
            return url
        time.sleep(0.5)
    raise RuntimeError(f"prometheus did not become ready at {url} within {timeout_s:.0f}s; see {root / 'prometheus.log'}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, promql: str, timeout_s: float = 10.0) -> list[dict]:
    """An instant PromQL query; the result vector. Raises with Prometheus's own error text."""
    from autoscaler.prometheus_source import http_query

    return http_query(url, promql, timeout_s)
