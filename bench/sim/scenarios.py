"""Fleet-simulator scenarios: topology and service generators, trace-driven arrival rates, YAML loading."""

from __future__ import annotations

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
                      affinity: str = "s2", tp_prefill: int = 1, tp_decode: int = 1) -> tuple[SimService, ...]:
    import random

    rng = random.Random(seed)
    return tuple(SimService(
        f"svc-{k:03d}",
        RateShape(mean_rps=rng.uniform(*mean_rps), peak_to_trough=rng.uniform(*peak_to_trough), day_s=day_s,
                  peak_hour=rng.uniform(10, 22)),
        mean_input, mean_output, ttft_slo_s, tbt_slo_s, model, prefill_gpu, decode_gpu, rng.randint(0, 3),
        affinity, tp_prefill, tp_decode) for k in range(count))


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


def _mean_sizes(rows) -> tuple[int, int]:
    return (round(sum(r.input_length for r in rows) / len(rows)),
            round(sum(r.output_length for r in rows) / len(rows)))


def load_scenario(path) -> Scenario:
    """Scenario YAML: name, duration_s, tick_s, startup_s, topology.generator, services.generator (see
    bench/scenarios/*.yaml). Unknown keys are errors that name the key."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load(Path(path).read_text())
    allowed = {"name", "duration_s", "tick_s", "startup_s", "topology", "services"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown scenario keys {unknown} (allowed: {sorted(allowed)})")
    base = Path(path).parent
    try:
        topo, svc = data["topology"]["generator"], dict(data["services"]["generator"])
        nodes = generate_nodes(**topo)
        sizes_from = svc.pop("sizes_from", None)  # {path, max_input, max_output}: mean sizes of a real trace
        if sizes_from:
            from bench.load.traces import truncate

            rows = truncate(read_trace(base / sizes_from["path"])[0], sizes_from.get("max_input", 4096),
                            sizes_from.get("max_output", 1024))
            svc["mean_input"], svc["mean_output"] = _mean_sizes(rows)
        services = generate_services(**{**svc, "mean_rps": tuple(svc["mean_rps"]),
                                        "peak_to_trough": tuple(svc["peak_to_trough"])})
        for extra in data["services"].get("from_traces", []):  # services replaying a trace file's arrivals
            rows = read_trace(base / extra["path"])[0]
            shape = TraceRate.from_trace(rows, extra.get("bin_s", 60.0), extra.get("time_scale", 1.0))
            services += (SimService(extra["name"], shape, *_mean_sizes(rows),
                                    extra.get("ttft_slo_s", 2.0), extra.get("tbt_slo_s", 0.05),
                                    extra.get("model", "llama-8b"), extra.get("prefill_gpu", "L20"),
                                    extra.get("decode_gpu", "H20"), extra.get("priority", 0),
                                    extra.get("affinity", "s2")),)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: bad topology/services generator: {err}") from None
    return Scenario(data["name"], nodes, services, float(data["duration_s"]), float(data.get("tick_s", 30.0)),
                    float(data.get("startup_s", 120.0)))
