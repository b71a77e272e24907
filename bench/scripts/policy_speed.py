"""Decision speed of the pure policy: 1,000 services decided in one `decide` call.

Prints JSON and writes bench/results/policy_speed.json: services per call, calls, p50/p99 call time, and
decisions per second. The baseline in the same run is one call per service (the per-service loop a naive
controller would run), so the ratio shows the cost of deciding the fleet in one pass.
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
from autoscaler.model import FleetConfig, Observation, PolicyConfig, PolicyState, ServiceObservation, Signal  # noqa: E402
from autoscaler.policy import decide  # noqa: E402

NUM_SERVICES = 1000
CALLS = 30


def _fleet(rng: random.Random) -> FleetConfig:
    services = {f"svc-{i:04d}": PolicyConfig(target_decode_tps_per_instance=rng.uniform(500, 3000),
                                             prefill_per_decode=rng.choice([0.25, 1 / 3, 0.5, 1.0]),
                                             max_prefill=200, max_decode=400, tbt_slo_s=0.05,
                                             priority=rng.randint(0, 3))
                for i in range(NUM_SERVICES)}
    return FleetConfig(services=services, gpu_budget=60_000)


def _observation(rng: random.Random, fleet: FleetConfig, now_s: float) -> Observation:
    return Observation(services={name: ServiceObservation(decode_tps=Signal(rng.uniform(0, 300_000), now_s - 5),
                                                          tbt_s=Signal(rng.uniform(0.01, 0.08), now_s - 5))
                                 for name in fleet.services})


def main() -> int:
    rng = random.Random(0)
    fleet = _fleet(rng)
    state, now = PolicyState(), 0.0
    fleet_times, per_service_times = [], []
    for _ in range(CALLS):
        now += 30.0
        observation = _observation(rng, fleet, now)
        start = time.perf_counter()
        _, next_state = decide(state, observation, now, fleet)
        fleet_times.append(time.perf_counter() - start)
        start = time.perf_counter()  # baseline: one decide() call per service
        for name, cfg in fleet.services.items():
            decide(PolicyState(services={name: state.services[name]} if name in state.services else {}),
                   Observation(services={name: observation.services[name]}), now,
                   FleetConfig(services={name: cfg}))
        per_service_times.append(time.perf_counter() - start)
        state = next_state
    p50 = statistics.median(fleet_times)
    result = {
        "services_per_call": NUM_SERVICES, "calls": CALLS,
        "fleet_call_p50_ms": round(p50 * 1000, 2),
        "fleet_call_p99_ms": round(sorted(fleet_times)[-1] * 1000, 2),
        "decisions_per_s": round(NUM_SERVICES / p50),
        "baseline_per_service_calls_p50_ms": round(statistics.median(per_service_times) * 1000, 2),
        "fleet_vs_per_service_ratio": round(p50 / statistics.median(per_service_times), 3),
    }
    write_result("policy_speed", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
