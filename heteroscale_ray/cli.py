"""`heteroscale` command line: local cluster, deploy, status, demo, tiny model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common.config import ConfigError, load_cluster_spec, load_fleet_spec, load_service_spec
from heteroscale_ray import console

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_CLUSTER = str(EXAMPLES / "cluster-local.yaml")
DEFAULT_SERVICE = str(EXAMPLES / "service-local.yaml")
DEMO_CLUSTER = str(EXAMPLES / "cluster-demo.yaml")  # one S1 with room for 2P+1D (the adaptive ratio's phase)


def _address(args) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS") or None


class Unreachable(Exception):
    """An endpoint or cluster the command needs does not answer; the message says which."""


def _check_endpoint(url: str, api_key: str | None) -> None:
    """Fail fast, in one line, when the endpoint a load test targets does not answer `GET /v1/models`."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10).raise_for_status()
    except httpx.HTTPStatusError as err:
        raise Unreachable(f"{url}: GET /v1/models answered {err.response.status_code}") from None
    except httpx.HTTPError as err:
        raise Unreachable(f"cannot reach {url} (GET /v1/models: {type(err).__name__}: {err})") from None


def cmd_up(args) -> int:
    from heteroscale_ray import local_cluster

    if _address(args):
        from heteroscale_ray import service
        from placement.ray_adapter import live_nodes

        service.connect(_address(args))
        nodes = live_nodes()
        print(f"using existing cluster at {_address(args)} ({len(nodes)} labelled accelerator nodes); "
              "nothing started")
        for n in nodes:
            print(f"  gpu_type={n.gpu_type} s1={n.s1} s2={n.s2} gpus={n.total_gpus} free={n.free_gpus}")
        return 0
    state = local_cluster.up(load_cluster_spec(args.cluster))
    if args.prometheus:
        from heteroscale_ray import prometheus

        prometheus.start(state.temp_dir, [args.ingress_target], port=args.prometheus_port or prometheus.DEFAULT_PORT)
    return 0


def cmd_down(args) -> int:
    from heteroscale_ray import local_cluster

    local_cluster.down()
    return 0


def _cluster_address(args) -> str | None:
    """--address / RAY_ADDRESS, else the running local cluster's; None (with a message) when there is none."""
    from heteroscale_ray import local_cluster

    address = _address(args)
    if address is None:
        state = local_cluster.read_state()
        if state is None or not local_cluster.is_running():
            print("error: no cluster: run `heteroscale up` first or set RAY_ADDRESS / --address", file=sys.stderr)
            return None
        local_cluster.use_auth(state)  # the local cluster runs with Ray's token authentication
        address = state.address
    return address


def cmd_deploy(args) -> int:
    from heteroscale_ray import service

    fleet = load_fleet_spec(args.fleet) if args.fleet else None
    spec = None if fleet else load_service_spec(args.service)
    address = _cluster_address(args)
    if address is None:
        return 2
    if fleet:
        service.deploy_fleet(fleet, address)
    else:
        service.deploy(spec, address)
    return 0


def cmd_undeploy(args) -> int:
    from heteroscale_ray import service

    fleet = load_fleet_spec(args.fleet) if args.fleet else None
    spec = None if fleet else load_service_spec(args.service)
    address = _cluster_address(args)  # never "auto": that would find whichever Ray cluster runs on this machine
    if address is None:
        return 2
    if fleet:
        service.undeploy_fleet(fleet, address)
        print(f"deleted fleet {fleet.name}: {', '.join(m.spec.name for m in fleet.members)}")
    else:
        service.undeploy(spec.name, address)
        print(f"deleted {spec.name}")
    return 0


def cmd_status(args) -> int:
    from heteroscale_ray import service

    fleet = load_fleet_spec(args.fleet) if args.fleet else None
    spec = None if fleet else load_service_spec(args.service)
    address = _cluster_address(args)
    if address is None:
        return 2
    if fleet:
        report = service.fleet_status(fleet.name, address)
        print(json.dumps(report, indent=2, default=str) if args.json else service.format_fleet_status(report))
        return 0
    report = service.status(spec, address)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(service.format_status(report))
    return 0


def cmd_demo(args) -> int:
    print(f"(Ray, vLLM and other library logs go to {console.log_path()}; their errors show here)")
    if args.quick:
        from heteroscale_ray import demo

        return demo.run(load_cluster_spec(args.cluster), load_service_spec(args.service), _address(args))
    if args.fleet:
        from heteroscale_ray import fleet_demo

        cluster = args.cluster if args.cluster != DEMO_CLUSTER else DEFAULT_CLUSTER  # two S1s, one group each
        return fleet_demo.run(load_cluster_spec(cluster), load_fleet_spec(args.fleet), _address(args),
                              runs_dir=args.runs_dir)
    from heteroscale_ray import autoscale_demo

    return autoscale_demo.run(load_cluster_spec(args.cluster), load_service_spec(args.service), _address(args),
                              runs_dir=args.runs_dir)


def cmd_model(args) -> int:
    from heteroscale_ray.tiny_model import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def cmd_validate(args) -> int:
    from common.config import check_service_fits_cluster

    from autoscaler.settings import check

    cluster = load_cluster_spec(args.cluster)
    spec = load_service_spec(args.service)
    check(spec)
    check_service_fits_cluster(spec, cluster)
    print(f"ok: {len(cluster.nodes)} nodes, service {spec.name} with {len(spec.deployment_groups)} deployment groups")
    return 0


def _load_trace(path: str, skip_bad: bool):
    from bench.load.traces import read_trace

    rows, report = read_trace(path, skip_bad=skip_bad)
    if report.skipped:
        print(f"skipped {report.skipped} bad rows of {path}, e.g. {report.first_errors[0]}", file=sys.stderr)
    return rows


def cmd_trace(args) -> int:
    from bench.load import traces

    rows = _load_trace(args.input, args.skip_bad)
    if args.synth_duration_s:
        shape = traces.RateShape(mean_rps=args.mean_rps, peak_to_trough=args.peak_to_trough, day_s=args.day_s)
        rows = traces.synthesize(shape, args.synth_duration_s, rows, seed=args.seed)
    if args.time_scale != 1.0:
        rows = traces.time_scale(rows, args.time_scale)
    if args.rate_scale != 1.0:
        rows = traces.rate_scale(rows, args.rate_scale, seed=args.seed)
    if args.max_input_tokens or args.max_output_tokens:
        rows = traces.truncate(rows, args.max_input_tokens or 10**9, args.max_output_tokens or 10**9)
    if args.duration_s:
        rows = traces.window(rows, 0.0, args.duration_s)
    traces.write_jsonl(rows, args.output)
    print(json.dumps({"output": args.output, **traces.summarize_trace(rows)}))
    return 0


def cmd_bench(args) -> int:
    import asyncio

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from bench.load import loadgen

    from bench.load import plots
    from bench.load.traces import truncate
    from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt

    cfg = loadgen.LoadConfig(
        url=args.url.rstrip("/"), model=args.model, api_key=args.api_key or os.environ.get("HETEROSCALE_API_KEY"),
        time_scale=args.time_scale, duration_s=args.duration, max_requests=args.max_requests,
        max_concurrency=args.max_concurrency, request_timeout_s=args.request_timeout_s,
        ttft_slo_ms=args.ttft_slo_ms, tbt_slo_ms=args.tbt_slo_ms)
    trace = _load_trace(args.trace, args.skip_bad)
    _check_endpoint(args.url, cfg.api_key)
    if args.max_input_tokens or args.max_output_tokens:
        trace = truncate(trace, args.max_input_tokens or 10**9, args.max_output_tokens or 10**9)
    planned = loadgen.plan(cfg, trace)
    if not planned:
        print("error: no request of the trace falls inside --duration/--max-requests", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(ensure_tiny_model()))
    with tqdm(total=len(planned), desc="building prompts", unit="req", disable=args.quiet) as bar:
        prompts = loadgen.build_prompts([req for req, _ in planned], tokenizer, make_prompt,
                                        lambda i, n: bar.update(1))
    print(f"replaying {len(planned)} requests open-loop against {cfg.url} "
          f"(last arrival at {planned[-1][1].scheduled_s:.1f}s)", file=sys.stderr)
    interrupted = False
    with tqdm(total=len(planned), desc="requests", unit="req", disable=args.quiet) as bar:
        try:
            asyncio.run(loadgen.replay(cfg, planned, prompts, on_done=lambda r: bar.update(1)))
        except KeyboardInterrupt:
            interrupted = True
    results = [res for _, res in planned]
    summary = loadgen.write_results(args.out, cfg, results, {"trace": args.trace, "interrupted": interrupted})
    extra = plots.read_series(args.extra_series) if args.extra_series else None
    summary["plots"] = plots.write_plots(results, args.out, extra=extra)
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("requests", "throughput", "ttft", "tbt", "slo")}, indent=2))
    return 130 if interrupted else 0


def cmd_profile(args) -> int:
    import yaml
    from transformers import AutoTokenizer

    from bench.load import profile
    from heteroscale_ray.tiny_model import ensure_tiny_model, make_prompt

    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        print(f"error: --rates ({args.rates!r}) must be positive numbers", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("HETEROSCALE_API_KEY")
    _check_endpoint(args.url, api_key)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(ensure_tiny_model()))
    result = profile.run(args.url, args.model, api_key, rates, args.step_s, args.input_tokens, args.output_tokens,
                         args.num_prefill, args.num_decode, args.ttft_slo_s, args.tbt_slo_s, tokenizer,
                         make_prompt, headroom=args.headroom, request_timeout_s=args.request_timeout_s,
                         progress=lambda m: print(m, file=sys.stderr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    profile.plot(result, out / "profile.png")
    (out / "autoscaling.yaml").write_text(yaml.safe_dump({"autoscaling": result["autoscaling"]}, sort_keys=False))
    print(yaml.safe_dump({"autoscaling": result["autoscaling"]}, sort_keys=False), end="")
    for role in ("decode", "prefill"):
        if not result[f"{role}_limit_reached"]:
            print(f"note: the highest step still met the {role} SLO; its capacity is a lower bound (step higher)",
                  file=sys.stderr)
    return 0


def cmd_sim(args) -> int:
    from bench.sim import run as sim_run
    from bench.sim import study
    from bench.sim.scenarios import load_scenario

    if args.suite:
        from bench.sim import suite

        if args.scenario:
            print("error: give --suite or --scenario, not both", file=sys.stderr)
            return 2
        report = suite.run_suite(workers=args.workers, progress=lambda m: print(m, file=sys.stderr))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite.json").write_text(json.dumps(report, indent=2))
        report["plots"] = suite.write_plots(report, out)
        (out / "suite.json").write_text(json.dumps(report, indent=2))
        print(suite.table(report))
        print(f"wrote {out / 'suite.json'} ({report['wall_s']} s)", file=sys.stderr)
        return 0
    if not args.scenario:
        print("error: give --scenario FILE or --suite", file=sys.stderr)
        return 2
    scenario = load_scenario(args.scenario)
    if args.metric_study:
        rows = study.metric_study(scenario.services[0])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        study.plot_metric_study(rows, out / "metric_study.png")
        (out / "metric_study.json").write_text(json.dumps({"service": scenario.services[0].name, "rows": rows},
                                                          indent=2))
        print(json.dumps(rows[:: max(1, len(rows) // 6)], indent=1))
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    summary, results = sim_run.simulate(scenario, policies, progress=lambda m: print(m, file=sys.stderr),
                                        tune_baselines=args.tune_baselines, workers=args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = sim_run.write_plots(summary, results, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    brief = {"scenario": summary["scenario"], "wall_s": summary["wall_s"], "goals": summary["goals"]}
    if "curation" in summary:
        brief["curation"] = {k: summary["curation"][k] for k in ("candidates", "chosen_per_service",
                                                                 "decode_tps_beats_gpu_util")}
    print(json.dumps(brief, indent=2))
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
    add("demo", cmd_demo, "up + deploy with the controller + a load that scales out and in + report + down",
        cluster=True, service=True, address=True)
    sub.choices["up"].add_argument("--prometheus", action="store_true",
                                   help="also start a Prometheus server on loopback scraping Ray's nodes and "
                                        "the ingress (Debian's prometheus, installed by `make install`)")
    sub.choices["up"].add_argument("--prometheus-port", type=int, default=None, help="default 9390")
    sub.choices["up"].add_argument("--ingress-target", default="127.0.0.1:8000",
                                   help="host:port of the ingress /metrics Prometheus scrapes")
    sub.choices["demo"].set_defaults(cluster=DEMO_CLUSTER)
    sub.choices["demo"].add_argument("--quick", action="store_true",
                                     help="instead: a burst of requests through fixed replicas (~3 min)")
    sub.choices["demo"].add_argument("--runs-dir", default="runs", help="where runs/demo-<UTC>/ goes")
    sub.choices["demo"].add_argument("--fleet", nargs="?", const=str(EXAMPLES / "fleet-local.yaml"), default=None,
                                     help="instead: two services under one fleet controller, a high priority one "
                                          "taking a best-effort one's group and giving it back (default fleet "
                                          "examples/fleet-local.yaml, cluster examples/cluster-local.yaml; "
                                          "runs/demo-fleet-<UTC>/, ~12 min)")
    add("model", cmd_model, "generate (or find) the tiny test model and print its path")
    add("validate", cmd_validate, "validate a cluster spec and a service spec together", cluster=True, service=True)
    add("status", cmd_status, "the service's DGs, replicas per role, targets and the controller's last decisions",
        service=True, address=True)
    sub.choices["status"].add_argument("--json", action="store_true", help="machine-readable output")
    for name in ("deploy", "undeploy", "status"):
        sub.choices[name].add_argument("--fleet", default=None,
                                       help="a fleet spec YAML (services sharing the cluster under one fleet "
                                            "controller, e.g. examples/fleet-local.yaml) instead of --service")

    def add_trace_options(p):
        p.add_argument("--skip-bad", action="store_true", help="skip and count bad CSV rows instead of failing")
        p.add_argument("--max-input-tokens", type=int, default=None, help="truncate prompt lengths to this")
        p.add_argument("--max-output-tokens", type=int, default=None, help="truncate output lengths to this")

    bench = sub.add_parser("bench", help="replay a trace open-loop against an OpenAI endpoint; write results")
    bench.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    bench.add_argument("--trace", required=True, help="trace: .jsonl (Mooncake-style), Azure or BurstGPT .csv")
    bench.add_argument("--out", required=True, help="output folder (requests.jsonl, summary.json, PNG plots)")
    bench.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5 = 2x faster)")
    bench.add_argument("--duration", type=float, default=None, help="send only requests arriving before S s")
    bench.add_argument("--max-requests", type=int, default=10_000)
    bench.add_argument("--max-concurrency", type=int, default=None)
    bench.add_argument("--request-timeout-s", type=float, default=120.0)
    bench.add_argument("--model", default=None, help="model id (default: the endpoint's first model)")
    bench.add_argument("--tokenizer", default=None, help="tokenizer path (default: the generated tiny model)")
    bench.add_argument("--api-key", default=None, help="default: $HETEROSCALE_API_KEY")
    bench.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    bench.add_argument("--tbt-slo-ms", type=float, default=200.0)
    bench.add_argument("--extra-series", default=None, help="JSONL of {t_s, name: value} rows to plot too")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trace_options(bench)
    bench.set_defaults(func=cmd_bench)

    trace = sub.add_parser("trace", help="convert / transform / synthesize a trace into Mooncake-style JSONL")
    trace.add_argument("input", help=".jsonl, Azure .csv or BurstGPT .csv (sizes source when synthesizing)")
    trace.add_argument("output", help="output .jsonl")
    trace.add_argument("--time-scale", type=float, default=1.0)
    trace.add_argument("--rate-scale", type=float, default=1.0)
    trace.add_argument("--duration-s", type=float, default=None, help="keep the first S seconds")
    trace.add_argument("--synth-duration-s", type=float, default=None,
                       help="synthesize a diurnal trace this long, drawing sizes from the input")
    trace.add_argument("--mean-rps", type=float, default=1.0)
    trace.add_argument("--peak-to-trough", type=float, default=3.0)
    trace.add_argument("--day-s", type=float, default=86_400.0, help="length of one diurnal cycle")
    trace.add_argument("--seed", type=int, default=0)
    add_trace_options(trace)
    trace.set_defaults(func=cmd_trace)

    prof = sub.add_parser("profile", help="stress-test a P/D endpoint at stepped rates; print its autoscaling section")
    prof.add_argument("--url", required=True, help="base URL of the service (fixed replica counts while profiling)")
    prof.add_argument("--rates", default="0.5,1,2,3,4", help="comma-separated request rates (req/s), one step each")
    prof.add_argument("--step-s", type=float, default=30.0, help="seconds per step")
    prof.add_argument("--input-tokens", type=int, default=200)
    prof.add_argument("--output-tokens", type=int, default=96)
    prof.add_argument("--num-prefill", type=int, default=1, help="prefill replicas serving during the test")
    prof.add_argument("--num-decode", type=int, default=1, help="decode replicas serving during the test")
    prof.add_argument("--ttft-slo-s", type=float, default=2.0)
    prof.add_argument("--tbt-slo-s", type=float, default=0.2)
    prof.add_argument("--headroom", type=float, default=0.9, help="target = headroom x the measured capacity")
    prof.add_argument("--request-timeout-s", type=float, default=120.0)
    prof.add_argument("--model", default=None)
    prof.add_argument("--tokenizer", default=None)
    prof.add_argument("--api-key", default=None)
    prof.add_argument("--out", required=True, help="folder for profile.json, profile.png, autoscaling.yaml")
    prof.set_defaults(func=cmd_profile)

    sim = sub.add_parser("sim", help="fleet simulator: the same decide()/place() against baselines")
    sim.add_argument("--scenario", help="scenario YAML (bench/scenarios/*.yaml)")
    sim.add_argument("--suite", action="store_true",
                     help="instead: every scenario of bench/scenarios/suite/, tuned on one day and scored on another, "
                          "each policy as a point and a front; writes OUT/suite.json and plots")
    sim.add_argument("--workers", type=int, default=2, help="processes to run the simulations on (default 2)")
    sim.add_argument("--policies", default="heteroscale,hpa_gpu_util,serve_queue,periodic,sla_planner,"
                     "static_peak,oracle", help="comma-separated policy names")
    sim.add_argument("--out", required=True, help="output folder (summary.json, PNG plots)")
    sim.add_argument("--tune-baselines", action="store_true",
                     help="also run each baseline at the setting of its grid chosen on the scenario's tuning day")
    sim.add_argument("--metric-study", action="store_true",
                     help="instead: the candidate signals of the scenario's first service vs load (paper Fig. 2)")
    sim.set_defaults(func=cmd_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(verbose=args.verbose)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as err:  # TraceError and config validation name the bad value
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err.filename or err}: no such file or directory", file=sys.stderr)
        return 2
    except Unreachable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConnectionError as err:  # Ray: no cluster at that address, GCS gone
        print(f"error: heteroscale {args.command}: cannot reach the Ray cluster ({_address(args) or 'local'}): "
              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
