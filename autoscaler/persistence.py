"""The controller's saved state as versioned JSON (not a pickle of live classes, which a rename made unreadable):
the policy's state per service, the deployment-group records and the tick count. Pure: bytes in, bytes out.

Format (version 1):
    {"version": 1, "ticks": 12,
     "policy": {"<service>": {"target_prefill": 1, "target_decode": 2, "last_scale_out_s": 1.0e9 | null,
                              "last_scale_in_s": ..., "last_latency_step_s": ..., "soft": null |
                              {"started_s", "from_prefill", "from_decode", "to_prefill", "to_decode", "to_ratio"},
                              "prefill_per_decode": null | 1.5, "ratio_estimate": ..., "ratio_sampled_s": ...,
                              "profile": null | {"period_s", "bin_s", "prev", "cur", "cur_n", "period_index",
                                                 "error", "errors_seen", "pending": [[t, forecast], ...]}}},
     "records": {"<group>": {"group": {"name", "service", "scope", "domain", "prefill_gpu_type",
                                       "decode_gpu_type", "num_prefill", "num_decode"},
                             "slot": 0, "withdrawn": {"prefill": 0, "decode": 1},
                             "members": {"admitted": {"prefill": ["<replica id>", ...], ...},
                                         "withdrawn": {"decode": ["<replica id>"]}}}},
     "preemptions": [{"service", "group", "for_service", "started_s", "num_prefill", "num_decode"}, ...]}
A state of another version, or one missing a field, is refused with a `StateError` naming what. (The adaptive
ratio's and the forecast's fields, and the preemptions, came later within version 1: a state without them reads
as fixed-ratio, cold history and no preemption in progress.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Mapping

from autoscaler.forecast import Profile
from autoscaler.membership import GroupMembers
from autoscaler.model import PolicyState, Preemption, ServiceState, SoftScaleIn
from common.vocab import DeploymentGroup, Role

STATE_VERSION = 1


def state_key(service: str) -> bytes:
    """The internal-KV key of a service's controller state."""
    return f"heteroscale/{service}/controller-state".encode()


class StateError(ValueError):
    """A saved state this controller cannot read (another version, a missing or bad field)."""


def encode(policy: PolicyState, records: Mapping[str, object], ticks: int) -> bytes:
    """`records`: group name -> `autoscaler.ray_world.GroupRecord`."""
    return json.dumps({
        "version": STATE_VERSION, "ticks": ticks,
        "policy": {name: {**{f.name: getattr(st, f.name) for f in fields(ServiceState)
                             if f.name not in ("soft", "profile")},
                          "soft": asdict(st.soft) if st.soft else None,
                          "profile": asdict(st.profile) if st.profile else None}
                   for name, st in policy.services.items()},
        "records": {name: {"group": asdict(r.group), "slot": r.slot,
                           "withdrawn": {role.value: n for role, n in r.withdrawn.items()},
                           "members": {"admitted": {role.value: sorted(ids) for role, ids in r.members.admitted.items()},
                                       "withdrawn": {role.value: sorted(ids)
                                                     for role, ids in r.members.withdrawn.items()}}}
                    for name, r in records.items()},
        "preemptions": [asdict(p) for p in policy.preemptions],
    }, sort_keys=True).encode()


def _profile(d: dict) -> Profile:
    return Profile(**{**d, **{k: tuple(d[k]) for k in ("prev", "cur", "cur_n")},
                      "pending": tuple((float(t), float(f)) for t, f in d["pending"])})


def decode(raw: bytes, record_type) -> tuple[PolicyState, dict[str, object], int]:
    """(policy state, records built with `record_type(group, slot, withdrawn, members)`, ticks)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateError(f"not a JSON controller state ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise StateError(f"saved controller state has version {found!r}; this controller reads {STATE_VERSION}")
    where = "state"
    try:
        policy = {}
        for name, st in data["policy"].items():
            where = f"policy.{name}"
            soft, profile = st.pop("soft", None), st.pop("profile", None)
            policy[name] = ServiceState(**st, soft=SoftScaleIn(**soft) if soft else None,
                                        profile=_profile(profile) if profile else None)
        records = {}
        for name, r in data["records"].items():
            where = f"records.{name}"
            ids = {kind: {Role(k): frozenset(v) for k, v in r["members"][kind].items()}
                   for kind in ("admitted", "withdrawn")}
            records[name] = record_type(DeploymentGroup(**r["group"]), int(r["slot"]),
                                        {Role(k): v for k, v in r["withdrawn"].items()},
                                        GroupMembers(ids["admitted"], ids["withdrawn"]))
        where = "preemptions"
        preemptions = tuple(Preemption(**p) for p in data.get("preemptions", ()))
        return PolicyState(services=policy, preemptions=preemptions), records, int(data["ticks"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"saved controller state: {where}: {type(exc).__name__}: {exc}") from None
