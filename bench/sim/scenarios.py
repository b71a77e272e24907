"""Fleet-simulator scenarios: topology and service generators, trace-driven arrival rates, YAML loading."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from bench.sim.model import Scenario, SimService
from bench.load.traces import RateShape, read_trace
from common.vocab import NodeInfo


def generate_nodes(s2: int, s1_per_s2: int, nodes_per_s1: int, gpus_per_node: int, types: Sequence[str],
                   seed: int = 0) -> tuple[NodeInfo, ...]:
    """A fleet mixing the three RDMA-subgroup kinds: S2s cycle through S1-heterogeneous (both types in every
    S1), S2-heterogeneous (each S1 one type) and S2-homogeneous (one type)."""
    nodes = []
    for a in range(s2):
        kind = a % 3
        for b in range(s1_per_s2):
            for i in range(nodes_per_s1):
                if kind == 0:
                    gpu = types[i % len(types)]
                elif kind == 1:
                    gpu = types[b % len(types)]
                else:
                    gpu = types[(a // 3) % len(types)]
                nodes.append(NodeInfo(f"n{a}-{b}-{i}", gpu, gpus_per_node, gpus_per_node, f"s2-{a}-s1-{b}",
                                      f"s2-{a}"))
    return tuple(nodes)


def generate_services(count: int, seed: int, mean_rps: tuple[float, float], peak_to_trough: tuple[float, float],
                      mean_input: int, mean_output: int, ttft_slo_s: float, tbt_slo_s: float, day_s: float,
                      model: str = "llama-8b", prefill_gpu: str = "L20", decode_gpu: str = "H20",
                      affinity: str = "s2", tp_prefill: int = 1, tp_decode: int = 1, prefix: str = "svc",
                      rps_scale: str = "uniform", sizes: tuple[tuple[int, int, float], ...] = ()
                      ) -> tuple[SimService, ...]:
    """`count` services of one class: mean rates drawn uniformly (or log-uniformly, `rps_scale: log`, to mix
    services from a fraction of one instance to hundreds) from `mean_rps`, diurnal peaks between 10:00 and
    22:00, priorities 0-3."""
    import math
    import random

    if rps_scale not in ("uniform", "log"):
        raise ValueError(f"rps_scale ({rps_scale!r}) must be 'uniform' or 'log'")
    if not 0 < mean_rps[0] <= mean_rps[1]:
        raise ValueError(f"mean_rps ({list(mean_rps)}) must be [low, high] with 0 < low <= high")
    rng = random.Random(seed)
    draw = (lambda: rng.uniform(*mean_rps)) if rps_scale == "uniform" else (  # noqa: E731
        lambda: math.exp(rng.uniform(math.log(mean_rps[0]), math.log(mean_rps[1]))))
    return tuple(SimService(
        f"{prefix}-{k:03d}",
        RateShape(mean_rps=draw(), peak_to_trough=rng.uniform(*peak_to_trough), day_s=day_s,
                  peak_hour=rng.uniform(10, 22)),
        mean_input, mean_output, ttft_slo_s, tbt_slo_s, model, prefill_gpu, decode_gpu, rng.randint(0, 3),
        affinity, tp_prefill, tp_decode, sizes) for k in range(count))


def lognormal_sizes(count: int = 20_000, seed: int = 5, input_median: float = 1800, input_sigma: float = 0.9,
                    input_max: int = 12_000, output_median: float = 40, output_sigma: float = 0.8,
                    output_max: int = 400) -> list[tuple[int, int]]:
    """A seeded synthetic request-size distribution: lognormal prompt and output lengths, clipped (default:
    prompt-heavy with short outputs and a long-prompt tail)."""
    import math
    import random

    rng = random.Random(seed)
    return [(min(input_max, max(16, round(rng.lognormvariate(math.log(input_median), input_sigma)))),
             min(output_max, max(2, round(rng.lognormvariate(math.log(output_median), output_sigma)))))
            for _ in range(count)]


@dataclass(frozen=True)
class TraceRate:
    """Arrival rate replayed from a trace: requests per `bin_s` bin, repeated cyclically over the trace span
    (scaled by `time_scale`). Same interface as RateShape (`rate`, `max_rate`)."""

    per_bin: tuple[float, ...]
    bin_s: float

    @classmethod
    def from_trace(cls, requests, bin_s: float = 60.0, time_scale: float = 1.0) -> TraceRate:
        if not requests:
            raise ValueError("an empty trace has no arrival rate")
        span = max(r.timestamp_ms for r in requests) / 1000 * time_scale
        counts = [0] * (int(span // bin_s) + 1)
        for r in requests:
            counts[int(r.timestamp_ms / 1000 * time_scale // bin_s)] += 1
        return cls(tuple(c / bin_s for c in counts), bin_s)

    def rate(self, t_s: float) -> float:
        return self.per_bin[int(t_s // self.bin_s) % len(self.per_bin)]

    def max_rate(self) -> float:
        return max(self.per_bin)


def _sizes(spec: dict, base) -> list[tuple[int, int]]:
    """(input, output) rows of a size spec: `sizes_from` {path, max_input, max_output} (a trace file, relative
    to the scenario) or `sizes_lognormal` {lognormal_sizes arguments}."""
    if "sizes_from" in spec:
        from bench.load.traces import truncate

        src = spec["sizes_from"]
        rows = truncate(read_trace(base / src["path"])[0], src.get("max_input", 4096), src.get("max_output", 1024))
        return [(r.input_length, r.output_length) for r in rows]
    return lognormal_sizes(**spec["sizes_lognormal"])


def _with_sizes(svc: dict, base) -> dict:
    """A generator spec with its size spec resolved into means and bins."""
    from bench.sim.model import size_bins

    svc = dict(svc)
    spec = {k: svc.pop(k) for k in ("sizes_from", "sizes_lognormal") if k in svc}
    if len(spec) > 1:
        raise ValueError("give one of sizes_from and sizes_lognormal, not both")
    if spec:
        rows = _sizes(spec, base)
        svc["mean_input"], svc["mean_output"] = (round(sum(r[0] for r in rows) / len(rows)),
                                                 round(sum(r[1] for r in rows) / len(rows)))
        svc["sizes"] = size_bins(rows)
    return {**svc, "mean_rps": tuple(svc["mean_rps"]), "peak_to_trough": tuple(svc["peak_to_trough"])}


def load_scenario(path) -> Scenario:
    """Scenario YAML: name, duration_s, tick_s, startup_s, topology.generator, and services as one
    `generator` and/or a list of `classes` (each a generator with its own `prefix`, model, GPUs, TP, SLOs,
    `rps_scale` and size distribution), plus `from_traces` (see bench/scenarios/*.yaml). Unknown keys are
    errors that name the key."""
    from pathlib import Path

    import yaml

    return scenario_from_dict(yaml.safe_load(Path(path).read_text()), Path(path).parent, path)


MAX_NODES = 200_000  # bounds that keep any scenario file finite in time and memory
MAX_SERVICES = 10_000
MAX_TICKS = 1_000_000


def _number(data: dict, key: str, path, default=None, minimum: float = 0.0, strict: bool = True,
            integer: bool = False) -> float:
    value = data.get(key, default)
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{path}: {key} ({value!r}) must be {kind} {'>' if strict else '>='} {minimum:g}")
    return value


def scenario_from_dict(data: dict, base, path="<scenario>") -> Scenario:
    """A scenario from its parsed YAML (`base`: the folder relative paths start from; `path` names it in
    errors). Any input gives a Scenario or one ValueError that names the field and the value."""
    from bench.sim.model import Capacity
    from bench.sim.perf_model import GPUS, MODELS

    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario is a mapping of name, duration_s, tick_s, startup_s, topology, "
                         f"services (got {type(data).__name__})")
    allowed = {"name", "duration_s", "tick_s", "startup_s", "startup_by_model", "topology", "services", "days"}
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown scenario keys {unknown} (allowed: {sorted(allowed)})")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{path}: name ({data.get('name')!r}) must be a non-empty string")
    duration, tick = _number(data, "duration_s", path), _number(data, "tick_s", path, 30.0)
    startup = _number(data, "startup_s", path, 120.0, strict=False)
    if duration / tick > MAX_TICKS:
        raise ValueError(f"{path}: duration_s / tick_s ({duration:g} / {tick:g}) is over {MAX_TICKS:,} ticks")
    try:
        topo = data["topology"]["generator"]
        if not isinstance(topo, dict):
            raise TypeError(f"topology.generator must be a mapping (got {type(topo).__name__})")
        sizes = [_number(topo, k, f"{path}: topology.generator", integer=True)
                 for k in ("s2", "s1_per_s2", "nodes_per_s1", "gpus_per_node")]
        if sizes[0] * sizes[1] * sizes[2] > MAX_NODES:
            raise ValueError(f"{path}: topology.generator makes {sizes[0] * sizes[1] * sizes[2]:,} nodes "
                             f"(at most {MAX_NODES:,})")
        types = topo.get("types")
        if not isinstance(types, list) or not types or any(t not in GPUS for t in types):
            raise ValueError(f"{path}: topology.generator.types ({types!r}) must be a list of {sorted(GPUS)}")
        nodes = generate_nodes(**topo)
        services_spec = data["services"]
        if not isinstance(services_spec, dict):
            raise TypeError(f"services must be a mapping (got {type(services_spec).__name__})")
        specs = ([data["services"]["generator"]] if "generator" in data["services"] else []) + list(
            data["services"].get("classes", []))
        services: tuple[SimService, ...] = ()
        for spec in specs:
            if not isinstance(spec, dict):
                raise TypeError(f"a service class must be a mapping (got {type(spec).__name__})")
            _number(spec, "count", f"{path}: services", minimum=0, strict=False, integer=True)
            if len(services) + spec["count"] > MAX_SERVICES:
                raise ValueError(f"{path}: more than {MAX_SERVICES:,} services")
            for key, known in (("model", MODELS), ("prefill_gpu", GPUS), ("decode_gpu", GPUS)):
                if key in spec and spec[key] not in known:
                    raise ValueError(f"{path}: services {key} ({spec[key]!r}) must be one of {sorted(known)}")
            services += generate_services(**_with_sizes(spec, base))
        for extra in data["services"].get("from_traces", []):  # services replaying a trace file's arrivals
            rows = read_trace(base / extra["path"])[0]
            shape = TraceRate.from_trace(rows, extra.get("bin_s", 60.0), extra.get("time_scale", 1.0))
            scale = _number(extra, "rate_scale", f"{path}: services.from_traces.{extra.get('name')}", 1.0)
            if scale != 1.0:  # the trace's arrivals at `rate_scale` x their rate (fleet scale)
                shape = TraceRate(tuple(r * scale for r in shape.per_bin), shape.bin_s)
            sized = _with_sizes({"sizes_from": {"path": extra["path"]}, "mean_rps": (1, 1),
                                 "peak_to_trough": (1, 1)}, base)
            services += (SimService(extra["name"], shape, sized["mean_input"], sized["mean_output"],
                                    extra.get("ttft_slo_s", 2.0), extra.get("tbt_slo_s", 0.05),
                                    extra.get("model", "llama-8b"), extra.get("prefill_gpu", "L20"),
                                    extra.get("decode_gpu", "H20"), extra.get("priority", 0),
                                    extra.get("affinity", "s2"), extra.get("tp_prefill", 1),
                                    extra.get("tp_decode", 1), sizes=sized["sizes"]),)
        for svc in services:  # each service's capacities exist (its model fits its GPUs, its SLOs are meetable)
            Capacity.of(svc)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: bad topology/services generator: {err!r}") from None
    except (ValueError, OverflowError, ZeroDivisionError) as err:
        message = str(err)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: service names repeat; give each class its own prefix")
    services = _with_startup(services, data.get("startup_by_model"), path)
    days = None
    if "days" in data:
        from bench.sim.days import parse_days

        days = parse_days(data["days"], base, path)
    return Scenario(data["name"], nodes, services, float(duration), float(tick), float(startup), days)


def _with_startup(services, table, path) -> tuple[SimService, ...]:
    """`startup_by_model: {<model>: {prefill_s, decode_s, per_extra_gpu_s}}`: each role's start-up to Ready,
    plus `per_extra_gpu_s` for each GPU of its tensor-parallel degree past the first (weights load and the
    engine's workers start per GPU); models not named keep the scenario's startup_s."""
    from dataclasses import replace

    from bench.sim.perf_model import MODELS

    if table is None:
        return services
    if not isinstance(table, dict):
        raise ValueError(f"{path}: startup_by_model ({table!r}) must be a mapping of model -> "
                         "{prefill_s, decode_s, per_extra_gpu_s}")
    for model, row in table.items():
        if model not in MODELS:
            raise ValueError(f"{path}: startup_by_model key ({model!r}) must be one of {sorted(MODELS)}")
        if not isinstance(row, dict) or set(map(str, row)) - {"prefill_s", "decode_s", "per_extra_gpu_s"}:
            raise ValueError(f"{path}: startup_by_model.{model} ({row!r}) must be a mapping of prefill_s, "
                             "decode_s, per_extra_gpu_s")
        for key in ("prefill_s", "decode_s"):
            _number(row, key, f"{path}: startup_by_model.{model}", strict=False)
        _number(row, "per_extra_gpu_s", f"{path}: startup_by_model.{model}", 0.0, strict=False)
    out = []
    for svc in services:
        row = table.get(svc.model)
        if row is None:
            out.append(svc)
            continue
        extra = row.get("per_extra_gpu_s", 0.0)
        out.append(replace(svc, startup_prefill_s=float(row["prefill_s"] + extra * (svc.tp_prefill - 1)),
                           startup_decode_s=float(row["decode_s"] + extra * (svc.tp_decode - 1))))
    return tuple(out)
