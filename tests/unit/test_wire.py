"""The typed, versioned wire messages (common.wire): each goes through `to_wire` and back unchanged, and a
message of another version, with a missing field or a bad value is refused with an error naming it."""

from __future__ import annotations

import pytest

from common.vocab import DeploymentGroup, Scope
from common.wire import EngineOptions, IngressReport, ReplicaReport, RoutingEntry, WireError, routing_weights

GROUP = DeploymentGroup("dg-a", "svc", Scope.S1, "s1-a", "L20", "H20", 1, 2)
MESSAGES = [
    ReplicaReport("r1", "dg-a", "decode", 120, 0, 2, 1, 0.25, (0, 3, 1), (1,), None, 0.5),
    IngressReport("i", {"dg-a": (0, 2)}, {"dg-a": 3}, admitted=10, shed=1),
    RoutingEntry("svc--dg-a", "svc:dg-a:decode", 2.0, GROUP),
    RoutingEntry("svc--dg-b", "svc:dg-b:decode", 0.0),
    EngineOptions("svc", "decode", "dg-a", "heteroscale-controller-svc", 1.0, 3, 0.5),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_goes_over_the_wire_and_back_unchanged(message):
    wire = message.to_wire()
    assert wire["v"] == 1
    assert type(message).from_wire(wire) == message


@pytest.mark.parametrize("cls, wire, says", [
    (ReplicaReport, {**MESSAGES[0].to_wire(), "v": 2}, "version 2"),
    (ReplicaReport, {k: v for k, v in MESSAGES[0].to_wire().items() if k != "generation_tokens"},
     "missing field 'generation_tokens'"),
    (ReplicaReport, {**MESSAGES[0].to_wire(), "role": "router"}, "'role' = 'router'"),
    (ReplicaReport, {**MESSAGES[0].to_wire(), "generation_tokens": 1.5}, "'generation_tokens' = 1.5"),
    (ReplicaReport, {**MESSAGES[0].to_wire(), "tbt_hist": [1, -1]}, "'tbt_hist' has a negative count"),
    (IngressReport, {**MESSAGES[1].to_wire(), "inflight": [1]}, "must be mappings"),
    (IngressReport, {**MESSAGES[1].to_wire(), "admitted": "many"}, "'admitted' = 'many'"),
    (RoutingEntry, {**MESSAGES[2].to_wire(), "weight": -1}, "'weight' = -1.0: negative"),
    (RoutingEntry, {**MESSAGES[2].to_wire(), "group": {"name": "x"}}, "field 'group'"),
    (EngineOptions, {**MESSAGES[4].to_wire(), "prefill_attempts": 0}, "prefill_attempts >= 1"),
    (EngineOptions, None, "expected a mapping"),
])
def test_a_message_this_side_cannot_read_is_refused_by_name(cls, wire, says):
    with pytest.raises(WireError, match=says):
        cls.from_wire(wire)


@pytest.mark.parametrize("routable, weights", [
    ([(2, 3)], [3.0]),  # one DG: its decode count
    ([(2, 2), (1, 1)], [2.0, 1.0]),  # groups at one P:D: their decode counts
    # (3P,1D) + (1P,1D): the second group has a quarter of the prefill, so it gets a third of the requests
    ([(3, 1), (1, 1)], [4 / 3, 2 / 3]),
    ([(2, 2), (0, 2)], [4.0, 0.0]),  # no routable prefill in a group: nothing to it (KV never leaves a DG)
    ([(2, 0), (1, 1)], [0.0, 1.0]),  # no routable decode: nothing to it
    ([(0, 2), (0, 1)], [2.0, 1.0]),  # no prefill anywhere: nothing to weigh by, the decode counts
    ([(0, 0), (0, 0)], [0.0, 0.0]),
    ([], []),
])
def test_routing_weights_follow_each_groups_scarcer_role(routable, weights):
    got = routing_weights(routable)
    assert got == pytest.approx(weights)
    if any(p for p, _ in routable) and any(d for _, d in routable):
        assert sum(got) == pytest.approx(sum(d for _, d in routable))  # in decode replicas, as admission reads it
