"""How long each DG role's replicas have not been Ready, and what a replica's start-up measured: the live
world's clock on starting replicas (`autoscaler.ray_world.RayWorld`). A replica not Ready past the world's bound
is stuck, not starting (defect 7 of issue 21); one that turns Ready measures a start-up, the forecast's horizon
(`autoscaler.forecast`). Times are the caller's; granularity is one observation (a control period)."""

from __future__ import annotations

from typing import Mapping

from common.vocab import Role


class PendingAges:
    def __init__(self) -> None:
        self.since: dict[tuple[str, Role], list[float]] = {}  # one start time per not-Ready replica, oldest first
        self._running: dict[tuple[str, Role], int] = {}  # Ready replicas per DG role at the last update
        self.startup_s: dict[Role, float] = {}  # the last measured start-up per role

    def update(self, now_s: float, targets: Mapping[str, Mapping[Role, int]],
               running: Mapping[str, Mapping[Role, int]]) -> None:
        """New not-Ready replicas start now; the oldest leave first (a replica that turned Ready measures now
        minus its start time; replicas Ready at the first update measure nothing). `targets` and `running`:
        per DG, per role."""
        self.since = {key: v for key, v in self.since.items() if key[0] in targets}
        for name, target in targets.items():
            for role in Role:
                ready = running.get(name, {}).get(role, 0)
                waiting = max(0, target.get(role, 0) - ready)
                since = self.since.setdefault((name, role), [])
                became_ready = max(0, ready - self._running.get((name, role), ready))
                for started in since[:min(became_ready, len(since))]:
                    self.startup_s[role] = now_s - started
                self._running[(name, role)] = ready
                del since[:max(0, len(since) - waiting)]
                since += [now_s] * (waiting - len(since))

    def older_than(self, name: str, role: Role, bound_s: float) -> int:
        """Not-Ready replicas of a DG role that started before `bound_s`."""
        return sum(1 for t in self.since.get((name, role), ()) if t < bound_s)

    def measured_startup(self) -> float | None:
        """The last measured start-up of a replica, the slower role's (None before any was measured)."""
        return max(self.startup_s.values()) if self.startup_s else None
