"""The shared control cycle (autoscaler.cycle) and its driver (autoscaler.port.step) against an in-memory world:
scale-out through place(), soft scale-in choosing DGs through place() (most precious tier first), terminate
and remove, restore, a ratio change that moves the roles apart, advisory mode, no data, idempotence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.cycle import ClusterView, CycleConfig, GroupActionKind, GroupState, cycle
from autoscaler.model import (
    Action,
    FleetConfig,
    Mode,
    Observation,
    PolicyConfig,
    PolicyState,
    Reason,
    RoleCounts,
    ScheduleWindow,
    ServiceState,
    ServiceObservation,
    Signal,
)
from autoscaler.port import step
from common.vocab import DeploymentGroup, NodeInfo, Scope
from placement.scheduler import ServiceShape, Why

# s1-a: an S1 in an all-H20 S2 (tier LOW); s1-b: an S1 that mixes H20 and L20 (tier HIGH).
NODES = (NodeInfo("a1", "H20", 4, 4, "s1-a", "s2-0"), NodeInfo("a2", "H20", 4, 4, "s1-a", "s2-0"),
         NodeInfo("b1", "H20", 4, 4, "s1-b", "s2-1"), NodeInfo("b2", "L20", 4, 4, "s1-b", "s2-1"))
SHAPE = ServiceShape("svc", ("H20",), ("H20",), affinity=Scope.S1)


def policy(**overrides) -> PolicyConfig:
    base = dict(target_decode_tps_per_instance=100.0, prefill_per_decode=0.5, scale_out_cooldown_s=0.0,
                scale_in_cooldown_s=0.0, soft_scale_in_window_s=60.0, max_step_fraction=10.0, ttft_slo_s=1.0)
    return PolicyConfig(**{**base, **overrides})


def config(**overrides) -> CycleConfig:
    return CycleConfig(FleetConfig(services={"svc": policy(**overrides)}), {"svc": SHAPE})


class FakeWorld:
    """Applies actions at once: every target replica is Ready, withdrawn as the action says."""

    def __init__(self, groups=(), nodes=NODES):
        self.nodes = nodes
        self.groups = {g.name: GroupState(g, RoleCounts(g.num_prefill), RoleCounts(g.num_decode)) for g in groups}
        self.tps, self.ttft_s, self.applied = 0.0, 0.1, []

    def observe(self, now_s):
        counts = list(self.groups.values())
        return Observation({"svc": ServiceObservation(
            decode_tps=Signal(self.tps, now_s), ttft_s=Signal(self.ttft_s, now_s),
            prefill=RoleCounts(sum(g.prefill.ready for g in counts), 0, sum(g.prefill.withdrawn for g in counts)),
            decode=RoleCounts(sum(g.decode.ready for g in counts), 0, sum(g.decode.withdrawn for g in counts)))})

    def cluster_view(self, now_s):
        used = {}
        for gs in self.groups.values():
            used[gs.group.domain] = used.get(gs.group.domain, 0) + gs.group.num_prefill + gs.group.num_decode
        nodes = []
        for n in self.nodes:  # charge each domain's use to its H20 nodes in order
            take = min(used.get(n.s1, 0), n.total_gpus) if n.gpu_type == "H20" else 0
            used[n.s1] = used.get(n.s1, 0) - take
            nodes.append(replace(n, free_gpus=n.total_gpus - take))
        return ClusterView(tuple(nodes), {"svc": tuple(self.groups[k] for k in sorted(self.groups))})

    def apply(self, actions, now_s):
        self.applied += list(actions)
        for a in actions:
            if a.kind is GroupActionKind.REMOVE:
                del self.groups[a.group.name]
            else:
                g = a.group
                self.groups[g.name] = GroupState(
                    g, RoleCounts(g.num_prefill - a.withdrawn_prefill, 0, a.withdrawn_prefill),
                    RoleCounts(g.num_decode - a.withdrawn_decode, 0, a.withdrawn_decode))
        return ()


def dg(name: str, domain: str, p: int, d: int) -> DeploymentGroup:
    return DeploymentGroup(name, "svc", Scope.S1, domain, "H20", "H20", p, d)


def counts(world: FakeWorld) -> dict[str, tuple[int, int, int, int]]:
    return {n: (g.group.num_prefill, g.group.num_decode, g.prefill.withdrawn, g.decode.withdrawn)
            for n, g in world.groups.items()}


def test_scale_out_creates_a_group_in_the_lowest_tier_and_reapplying_changes_nothing():
    world, cfg = FakeWorld(), config()
    world.tps = 300.0  # 3 decode instances at 100 tokens/s each, P = ceil(3 x 0.5) = 2
    result, state, _, _ = step(world, PolicyState(), 100.0, cfg)
    (action,) = result.actions
    assert action.kind is GroupActionKind.CREATE and action.reason is Reason.PROPORTIONAL
    assert action.why is Why.LOWEST_TIER and action.group.domain == "s1-a"  # LOW before HIGH
    assert (action.group.num_prefill, action.group.num_decode) == (2, 3)
    assert action.placement is not None and action.placement.num_decode == 3  # the batch a live world probes
    assert counts(world) == {"svc-s1-a": (2, 3, 0, 0)}
    for now_s in (130.0, 160.0):  # same load: the targets hold, nothing to do
        result, state, _, _ = step(world, state, now_s, cfg)
        assert result.actions == ()
    # the same actions applied twice leave the world as it was (level-triggered)
    before = counts(world)
    world.apply(world.applied[:1], 200.0)
    assert counts(world) == before


def test_soft_scale_in_withdraws_the_most_precious_tier_first_then_terminates_those_replicas():
    world, cfg = FakeWorld([dg("g-low", "s1-a", 1, 2), dg("g-high", "s1-b", 1, 2)]), config()
    world.tps = 300.0  # targets (2, 4) -> (2, 3): one decode replica to give up
    result, state, _, _ = step(world, PolicyState(), 100.0, cfg)
    (action,) = result.actions
    assert action.kind is GroupActionKind.WITHDRAW and action.group.name == "g-high"
    assert (action.withdrawn_prefill, action.withdrawn_decode) == (0, 1)
    assert action.why is Why.SCALE_IN_PRECIOUS_FIRST and action.reason is Reason.PROPORTIONAL
    assert counts(world) == {"g-low": (1, 2, 0, 0), "g-high": (1, 2, 0, 1)}  # still running, out of routing
    result, state, _, _ = step(world, state, 130.0, cfg)  # observing: nothing changes
    assert result.actions == () and result.decision.services["svc"].reason is Reason.SOFT_SCALE_IN_OBSERVING
    result, state, _, _ = step(world, state, 170.0, cfg)  # the window passed with SLOs held
    (action,) = result.actions
    assert action.kind is GroupActionKind.SCALE and action.reason is Reason.SOFT_SCALE_IN_DONE
    assert counts(world) == {"g-low": (1, 2, 0, 0), "g-high": (1, 1, 0, 0)}  # exactly the withdrawn one went


def test_restore_when_the_slo_degrades_while_observing():
    world, cfg = FakeWorld([dg("g-low", "s1-a", 1, 2), dg("g-high", "s1-b", 1, 2)]), config()
    world.tps = 300.0
    _, state, _, _ = step(world, PolicyState(), 100.0, cfg)
    world.ttft_s = 5.0  # 5 x the TTFT SLO
    result, state, _, _ = step(world, state, 120.0, cfg)
    (action,) = result.actions
    assert action.kind is GroupActionKind.WITHDRAW and action.reason is Reason.SOFT_SCALE_IN_SLO_DEGRADED
    assert counts(world) == {"g-low": (1, 2, 0, 0), "g-high": (1, 2, 0, 0)}


def test_a_group_withdrawn_whole_is_removed_on_terminate():
    world = FakeWorld([dg("g-low", "s1-a", 1, 1), dg("g-high", "s1-b", 1, 1)])
    cfg = config(prefill_per_decode=1.0)
    world.tps = 100.0  # (2, 2) -> (1, 1)
    result, state, _, _ = step(world, PolicyState(), 100.0, cfg)
    assert [(a.kind, a.group.name) for a in result.actions] == [(GroupActionKind.WITHDRAW, "g-high")]
    assert counts(world)["g-high"] == (1, 1, 1, 1)
    result, _, _, _ = step(world, state, 170.0, cfg)
    assert [(a.kind, a.group.name) for a in result.actions] == [(GroupActionKind.REMOVE, "g-high")]
    assert counts(world) == {"g-low": (1, 1, 0, 0)}


def test_a_schedule_that_changes_the_ratio_moves_the_roles_apart_in_one_cycle():
    schedule = (ScheduleWindow(0, 43_200, 4, 1.0), ScheduleWindow(43_200, 86_400, 4, 3.0))
    cfg = config(mode=Mode.PERIODIC, schedule=schedule, prefill_per_decode=1.0, soft_scale_in_window_s=0.0,
                 min_prefill=1, max_prefill=8)
    world = FakeWorld([dg("g", "s1-a", 2, 2)])
    result, state, _, _ = step(world, PolicyState(), 43_100.0, cfg)
    assert result.actions == ()  # (2, 2) is the first window's size
    result, state, _, _ = step(world, state, 43_300.0, cfg)  # second window: 3 prefill, 1 decode
    (action,) = result.actions
    assert action.kind is GroupActionKind.SCALE and action.reason is Reason.SCHEDULE
    assert counts(world) == {"g": (3, 1, 0, 0)} and result.unplaced == ()


def test_advisory_mode_decides_and_places_but_the_driver_applies_nothing():
    world, cfg = FakeWorld(), config(advisory=True)
    world.tps = 300.0
    result, _, _, _ = step(world, PolicyState(), 100.0, cfg)
    assert [a.kind for a in result.actions] == [GroupActionKind.CREATE]
    assert all(a.advisory for a in result.actions)
    assert world.applied == [] and world.groups == {}


@pytest.mark.parametrize("tps", [None, float("nan")])
def test_missing_or_nan_decode_tps_leaves_the_groups_alone(tps):
    world, cfg = FakeWorld([dg("g-low", "s1-a", 1, 2), dg("g-high", "s1-b", 1, 2)]), config()
    world.tps = tps
    result, _, _, _ = step(world, PolicyState(), 100.0, cfg)
    assert result.actions == () and result.decision.services["svc"].reason is Reason.NO_DATA


def test_the_cycle_is_deterministic_and_does_not_touch_its_inputs():
    world, cfg = FakeWorld([dg("g-low", "s1-a", 1, 2)]), config()
    world.tps = 400.0
    obs, view = world.observe(100.0), world.cluster_view(100.0)
    first = cycle(PolicyState(), obs, view, 100.0, cfg)
    assert cycle(PolicyState(), obs, view, 100.0, cfg) == first
    assert view == world.cluster_view(100.0)  # the tree place() fills is the cycle's own
    (action,) = first[0].actions
    assert action.kind is GroupActionKind.SCALE and (action.group.num_prefill, action.group.num_decode) == (2, 4)


def test_config_needs_a_shape_for_every_service():
    with pytest.raises(ValueError, match=r"services \['other'\] have a policy but no placement shape"):
        CycleConfig(FleetConfig(services={"svc": policy(), "other": policy()}), {"svc": SHAPE})


def test_when_the_groups_domain_is_full_the_rest_opens_a_new_group_elsewhere():
    world, cfg = FakeWorld([dg("g-low", "s1-a", 1, 2)]), config()
    world.tps = 700.0  # (1, 2) -> (4, 7): 8 more GPUs, s1-a has 5 free
    result, _, _, _ = step(world, PolicyState(), 100.0, cfg)
    assert sorted((a.kind.value, a.group.name, a.why) for a in result.actions) == [
        ("create", "svc-s1-b", Why.SPLIT), ("scale", "g-low", Why.SPLIT)]
    held = counts(world)
    assert sum(v[0] for v in held.values()) == 4 and sum(v[1] for v in held.values()) == 7
    assert all(p >= 1 and d >= 1 for p, d, _, _ in held.values())  # every sub-batch is whole


def test_a_scale_out_that_does_not_fit_leaves_the_policy_at_the_placed_size():
    """A full fleet and a latency breach every cycle: each cycle asks one latency step over what exists, and
    the target never runs away from the placed size (it grew to the policy's bounds before)."""
    nodes = (NodeInfo("a1", "H20", 4, 4, "s1-a", "s2-0"),)  # 4 GPUs in all
    world, cfg = FakeWorld([dg("g", "s1-a", 1, 2)], nodes=nodes), config(latency_cooldown_s=0.0)
    world.tps, world.ttft_s = 200.0, 5.0  # within the band, but TTFT 5x its SLO
    state = PolicyState()
    asked = []
    for i in range(12):
        result, state, _, _ = step(world, state, 100.0 + 30 * i, cfg)
        asked += [(u.num_prefill, u.num_decode) for u in result.unplaced]
        held = counts(world)["g"]
        st = state.services["svc"]
        assert (st.target_prefill, st.target_decode) == (held[0], held[1])
    assert counts(world)["g"][:2] == (1, 2)  # one latency step (+1P +1D) needs 2 GPUs; 1 is free
    assert asked and set(asked) == {(1, 1)}  # one step over the real size, every cycle


def test_a_hold_never_cuts_what_the_groups_hold():
    """No saved state, one DG holding 3P + 2D at ratio 0.5 and decode tokens/s missing: the policy holds at the
    size it seeds from the view's decode (2P/2D); the cycle terminates nothing (only a scale-in decision may),
    and the policy's state follows what runs."""
    world, cfg = FakeWorld([dg("svc-s1-a", "s1-a", 3, 2)]), config()
    world.tps = None  # missing
    world.observe = lambda now_s, w=world: Observation({"svc": ServiceObservation(
        prefill=RoleCounts(3), decode=RoleCounts(2))})
    result, state, _, _ = step(world, PolicyState(), 100.0, cfg)
    assert result.decision.services["svc"].reason is Reason.NO_DATA
    assert result.actions == () and counts(world) == {"svc-s1-a": (3, 2, 0, 0)}
    assert (state.services["svc"].target_prefill, state.services["svc"].target_decode) == (3, 2)


def test_a_soft_scale_in_cancels_starting_replicas_only_in_the_groups_where_they_start():
    """Issue 21: the cut of starting replicas a soft scale-in makes (the groups hold more than the policy's
    target) comes from the groups where replicas start, never from a serving group, even when place()'s
    scale-in rule would take the most precious tier first (s1-b here: a serving group)."""
    serving = GroupState(dg("a", "s1-b", 1, 2), RoleCounts(1), RoleCounts(2))
    starting = GroupState(dg("b", "s1-a", 1, 2), RoleCounts(1), RoleCounts(1, pending=1))
    view = ClusterView(NODES, {"svc": (serving, starting)})
    state = PolicyState({"svc": ServiceState(target_prefill=2, target_decode=3)})
    obs = Observation({"svc": ServiceObservation(decode_tps=Signal(50.0, 1000.0), ttft_s=Signal(0.1, 1000.0),
                                                 prefill=RoleCounts(2), decode=RoleCounts(3, pending=1))})
    result, _ = cycle(state, obs, view, 1000.0, config())
    assert result.decision.services["svc"].action is Action.SCALE_IN
    cuts = {a.group.name: (a.group.num_prefill, a.group.num_decode) for a in result.actions
            if a.kind is GroupActionKind.SCALE}
    assert cuts == {"b": (1, 1)}, result.actions
    assert all(a.group.name != "a" or a.kind is GroupActionKind.WITHDRAW for a in result.actions)
