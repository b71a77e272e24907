"""Which replicas of a deployment group (DG) may receive new requests: soft scale-in and ready-ratio gating per
replica. Pure: no Ray, no clock; the controller persists it and tells each replica in its report's answer.

- Withdrawn: the control cycle says how many of a DG's replicas per role stay out of routing; which ones is
  decided here: those already withdrawn that are still alive first, then the least loaded routable ones (fewest
  running requests, then id). A restore withdraws none. Withdrawn replicas finish what they hold.
- Gated (paper §6, ready-ratio gating): a newly RUNNING replica joins routing only while its role is not
  over-represented in the DG's admitted prefill:decode counts (`autoscaler.gating.admitted_roles`); replicas
  already admitted are never removed by this rule.
A replica is routable when it is admitted and not withdrawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from autoscaler.gating import admitted_roles
from common.defaults import AUTOSCALING as DEFAULTS
from common.vocab import Role


@dataclass(frozen=True)
class GroupMembers:
    """Per role: the replica ids admitted to routing once, and those withdrawn now."""

    admitted: Mapping[Role, frozenset[str]] = field(default_factory=dict)
    withdrawn: Mapping[Role, frozenset[str]] = field(default_factory=dict)

    def routable(self, role: Role, replica_id: str) -> bool:
        return replica_id in self.admitted.get(role, frozenset()) and \
            replica_id not in self.withdrawn.get(role, frozenset())

    def num_withdrawn(self, role: Role) -> int:
        return len(self.withdrawn.get(role, ()))


def update_members(members: GroupMembers, live: Mapping[Role, frozenset[str]], num_withdrawn: Mapping[Role, int],
                   load: Mapping[str, int], prefill_per_decode: float,
                   tolerance_instances: int = DEFAULTS["ready_ratio_tolerance_instances"],
                   tolerance_fraction: float = DEFAULTS["ready_ratio_tolerance_fraction"]) -> GroupMembers:
    """The DG's membership after this tick, given the live (RUNNING) replica ids per role and how many of each
    role the cycle wants withdrawn. Dead replicas drop out of both sets."""
    admitted = {role: set(members.admitted.get(role, frozenset()) & live.get(role, frozenset())) for role in Role}
    new = {role: sorted(live.get(role, frozenset()) - admitted[role]) for role in Role}
    while True:  # admit new replicas one at a time while their role is not ahead of the ratio
        allowed = admitted_roles(len(admitted[Role.PREFILL]), len(admitted[Role.DECODE]), prefill_per_decode,
                                 tolerance_instances, tolerance_fraction)
        role = next((r for r in (Role.DECODE, Role.PREFILL) if r in allowed and new[r]), None)
        if role is None:
            break
        admitted[role].add(new[role].pop(0))
    withdrawn = {}
    for role in Role:
        want = max(0, min(num_withdrawn.get(role, 0), len(live.get(role, ()))))
        keep = sorted(members.withdrawn.get(role, frozenset()) & live.get(role, frozenset()))[:want]
        others = sorted(live.get(role, frozenset()) - set(keep), key=lambda rid: (load.get(rid, 0), rid))
        withdrawn[role] = frozenset(keep + others[:want - len(keep)])
    return GroupMembers({r: frozenset(s) for r, s in admitted.items()}, withdrawn)
