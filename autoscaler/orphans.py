"""Deployment groups Serve runs that the controller has no record of (orphans), and what it does with them.

A controller whose saved state was unreadable (another version, a missing field: `autoscaler.persistence`)
knows only the service file's groups; the groups it created at run time still run in Serve and hold GPUs.
Each group the controller creates therefore also gets a small record of its own in the KV, written before
its application is deployed (so a deploy that timed out but went through later is known too) and deleted
when the group is removed:

    heteroscale/<service>/group/<name> = {"version": 1, "group": {<DeploymentGroup fields>}, "slot": 0}

On every observation the controller looks for `<service>--<group>` applications it has no record of:
- with a readable group record: **adopted** — the record joins the others with Serve's current targets as
  the group's counts (the policy, if it has no state either, is seeded from what the groups hold, so nothing
  is cut), and the group is routed again from the next routing table;
- without one (never ours, or unreadable): **retired** softly — it is not in the routing table, so the
  ingress sends it no new request; after the drain time its in-flight requests are done and its application
  is deleted. Nothing is terminated while it may still serve.
Pure: the KV and Serve calls are the caller's.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from common.vocab import DeploymentGroup

GROUP_RECORD_VERSION = 1


def group_key(service: str, group: str) -> bytes:
    return f"heteroscale/{service}/group/{group}".encode()


def encode_group(group: DeploymentGroup, slot: int) -> bytes:
    return json.dumps({"version": GROUP_RECORD_VERSION, "group": asdict(group), "slot": slot}, sort_keys=True).encode()


def decode_group(raw: bytes) -> tuple[DeploymentGroup, int]:
    """The group and its port slot; ValueError naming what is wrong for another version or a bad field."""
    try:
        data = json.loads(raw)
        if data.get("version") != GROUP_RECORD_VERSION:
            raise ValueError(f"group record has version {data.get('version')!r}; this controller reads "
                             f"{GROUP_RECORD_VERSION}")
        return DeploymentGroup(**data["group"]), int(data["slot"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"group record: {type(exc).__name__}: {exc}") from None


def unknown_groups(details: dict, service: str, known: set[str]) -> list[str]:
    """Names of the service's DG applications in Serve's instance details that are not in `known`."""
    prefix = f"{service}--"
    return sorted(app[len(prefix):] for app in (details.get("applications") or {})
                  if app.startswith(prefix) and app[len(prefix):] not in known)
