"""The port between the control cycle and a world, and the one driver loop step.

A world (the fleet simulator's `bench.sim.world.SimWorld`, the live Ray controller) implements `World`: it reports
what it observes and what its cluster looks like, and applies actions. `step()` is the whole loop body: observe,
run the pure `cycle()`, apply. No other module writes an observe/decide/place loop. Pure: the clock is the
caller's `now_s`; I/O happens only inside the world's methods.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from autoscaler.cycle import ClusterView, CycleConfig, CycleResult, GroupAction, cycle
from autoscaler.model import Observation, PolicyState


class World(Protocol):
    def observe(self, now_s: float) -> Observation:
        """Windowed signals per service (missing or stale values stay missing)."""

    def cluster_view(self, now_s: float) -> ClusterView:
        """Accelerator nodes with free GPUs and each service's DGs with their targets and replica states."""

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> None:
        """Make each DG's desired state real (idempotent: the same actions twice change nothing)."""


def step(world: World, state: PolicyState, now_s: float, config: CycleConfig
         ) -> tuple[CycleResult, PolicyState, Observation, ClusterView]:
    """One control period: observe, decide and place, apply what is not advisory. Returns the cycle's result
    and new state, and what it observed (for the decision log and the parity replay)."""
    observation = world.observe(now_s)
    view = world.cluster_view(now_s)
    result, state = cycle(state, observation, view, now_s, config)
    world.apply([a for a in result.actions if not a.advisory], now_s)
    return result, state, observation, view
