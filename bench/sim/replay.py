"""A world that replays what another world observed: the parity check between the live controller and the
simulator's driver. It implements `autoscaler.port.World`: `observe()` and `cluster_view()` return the recorded
observation and cluster view of the tick at `now_s`, `apply()` keeps what the cycle asked for and fails what
failed then. Records are (now_s, observation, view, actions, failed actions). Pure Python.
"""

from __future__ import annotations

from typing import Sequence

from autoscaler.cycle import ClusterView, CycleConfig, GroupAction
from autoscaler.model import Observation, PolicyState
from autoscaler.port import step


class ReplayWorld:
    def __init__(self, records: Sequence[tuple[float, Observation, ClusterView, tuple[GroupAction, ...],
                                              tuple[GroupAction, ...]]]):
        self._by_time = {now: (obs, view, failed) for now, obs, view, _, failed in records}
        self.applied: list[tuple[float, tuple[GroupAction, ...]]] = []

    def observe(self, now_s: float) -> Observation:
        return self._by_time[now_s][0]

    def cluster_view(self, now_s: float) -> ClusterView:
        return self._by_time[now_s][1]

    def apply(self, actions: Sequence[GroupAction], now_s: float) -> tuple[GroupAction, ...]:
        self.applied.append((now_s, tuple(actions)))
        return self._by_time[now_s][2]


def replay(records, config: CycleConfig, state: PolicyState = PolicyState()) -> list[tuple[float, tuple]]:
    """Drive the shared step over the recorded ticks; returns (now_s, actions) per tick, advisory ones included."""
    world, out = ReplayWorld(records), []
    for now_s, *_ in records:
        result, state, _, _ = step(world, state, now_s, config)
        out.append((now_s, result.actions))
    return out
