"""`heteroscale` command line: local cluster, deploy, status, demo, tiny model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from heteroscale_ray.config import ConfigError, load_cluster_spec, load_service_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_CLUSTER = str(EXAMPLES / "cluster-local.yaml")
DEFAULT_SERVICE = str(EXAMPLES / "service-local.yaml")


def _address(args) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS") or None


def cmd_up(args) -> int:
    from heteroscale_ray import local_cluster

    if _address(args):
        from heteroscale_ray import service

        service.connect(_address(args))
        facts = service.node_facts()
        print(f"using existing cluster at {_address(args)} ({len(facts)} nodes); nothing started")
        for f in facts:
            print(f"  gpu_type={f.gpu_type} s1={f.s1} s2={f.s2} gpus={f.num_gpus_total:g}")
        return 0
    local_cluster.up(load_cluster_spec(args.cluster))
    return 0


def cmd_down(args) -> int:
    from heteroscale_ray import local_cluster

    local_cluster.down()
    return 0


def cmd_deploy(args) -> int:
    from heteroscale_ray import local_cluster, service

    spec = load_service_spec(args.service)
    address = _address(args)
    if address is None:
        state = local_cluster.read_state()
        if state is None or not local_cluster.is_running():
            print("no cluster: run `heteroscale up` first or set RAY_ADDRESS", file=sys.stderr)
            return 2
        address = state.address
    service.deploy(spec, address)
    return 0


def cmd_undeploy(args) -> int:
    from heteroscale_ray import local_cluster, service

    spec = load_service_spec(args.service)
    state = local_cluster.read_state()
    service.undeploy(spec.name, _address(args) or (state.address if state else None))
    print(f"deleted {spec.name}")
    return 0


def cmd_demo(args) -> int:
    from heteroscale_ray import demo

    return demo.run(load_cluster_spec(args.cluster), load_service_spec(args.service), _address(args))


def cmd_model(args) -> int:
    from heteroscale_ray.tiny_model import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def cmd_validate(args) -> int:
    from heteroscale_ray.config import check_service_fits_cluster

    cluster = load_cluster_spec(args.cluster)
    spec = load_service_spec(args.service)
    check_service_fits_cluster(spec, cluster)
    print(f"ok: {len(cluster.nodes)} nodes, service {spec.name} with {len(spec.deployment_groups)} deployment groups")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heteroscale", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text, cluster=False, service=False, address=False):
        p = sub.add_parser(name, help=help_text)
        if cluster:
            p.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster spec YAML (local cluster)")
        if service:
            p.add_argument("--service", default=DEFAULT_SERVICE, help="service spec YAML")
        if address:
            p.add_argument("--address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS)")
        p.set_defaults(func=func)

    add("up", cmd_up, "start the local labelled Ray cluster (unless --address/RAY_ADDRESS)", cluster=True,
        address=True)
    add("down", cmd_down, "stop the local cluster started by `up` (and nothing else)")
    add("deploy", cmd_deploy, "deploy the P/D service and wait until it is RUNNING", service=True, address=True)
    add("undeploy", cmd_undeploy, "delete the P/D service", service=True, address=True)
    add("demo", cmd_demo, "up + deploy + a burst of requests + report + down", cluster=True, service=True,
        address=True)
    add("model", cmd_model, "generate (or find) the tiny test model and print its path")
    add("validate", cmd_validate, "validate a cluster spec and a service spec together", cluster=True, service=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
