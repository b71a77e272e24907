"""The live controller's promises (issue 21), each defect with the test that failed before its fix: against the
fake Serve, KV and clock of `tests/unit/test_controller.py` (no Ray)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from autoscaler.cycle import GroupAction, GroupActionKind
from common.vocab import group_app_name
from tests.unit.test_controller import SERVICE, Harness, two_groups


def status(h: Harness) -> dict:
    return asyncio.run(h.ctl.status())


def test_a_scale_out_that_did_not_fit_leaves_the_policy_at_the_size_that_exists():
    """Phantom targets: a probe that fails deploys nothing, and the policy's state says so (it kept the higher
    target, so latency steps compounded on a size that never existed)."""
    h = Harness()
    h.serve.fits = False
    entries = h.run(10, decode_tps_each=180)
    assert any(e["action"] == "scale_out" for e in entries)
    assert any(e["failed"] for e in entries)  # the decision log says which actions did not happen
    st = status(h)
    assert (st["target_prefill"], st["target_decode"]) == (1, 1)
    assert h.ctl.errors["apply"] >= 1


def test_one_failing_action_does_not_stop_the_others_and_the_tick_keeps_what_happened():
    """Partial apply: the world applies every action it can and returns the ones it could not (it raised at the
    first failure, after earlier ones had happened, and the tick kept the old state)."""
    h = two_groups()
    world = h.ctl.world
    failing = group_app_name(SERVICE, "dg-a")
    real_set_target = h.serve.set_target

    def set_target(app, deployment, n):
        if app == failing:
            raise ConnectionError("serve controller unreachable")
        real_set_target(app, deployment, n)

    h.serve.set_target = set_target
    a, b = (world.records[name].group for name in ("dg-a", "tiny-chat-s1-b"))
    shrink_a = GroupAction(GroupActionKind.SCALE, replace(a, num_prefill=0, num_decode=0))
    withdraw_b = GroupAction(GroupActionKind.WITHDRAW, b, withdrawn_prefill=1, withdrawn_decode=1)
    failed = world.apply([shrink_a, withdraw_b], 0.0)
    assert [f.group.name for f in failed] == ["dg-a"]
    assert set(world.records["tiny-chat-s1-b"].withdrawn.values()) == {1}
    assert world.records["dg-a"].group == a  # what failed is not recorded as done
