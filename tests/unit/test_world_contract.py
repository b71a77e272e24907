"""The contract every `autoscaler.port.World` keeps (issue 21), one suite over three worlds: the simulated world
(`bench.sim.world.SimWorld`), the live world (`autoscaler.ray_world.RayWorld`) over a fake Serve whose replicas
may stay starting (non-RUNNING) and whose nodes carry GPU types, and the replay world (`bench.sim.replay`) fed
with what the simulated world recorded. The same demand goes up and down through `autoscaler.port.step`:
- the actions a step applies never cut without a scale-in decision (a hold never shrinks), a cut removes
  only withdrawn or starting replicas, and every group holding both roles is inside the ratio band;
- applying the same actions twice changes nothing, and the view after a step shows what was applied (the
  replay world's view is the recorded one by design: it is checked for idempotence only);
- missing is never zero: a world with nothing measured yet reports decode tokens/s missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from autoscaler.cycle import ClusterView, CycleConfig, GroupActionKind
from autoscaler.model import Action, FleetConfig, PolicyConfig, PolicyState
from autoscaler.port import step
from bench.sim.model import PolicyResult, Scenario, SimService
from bench.sim.replay import ReplayWorld
from bench.sim.scenarios import TraceRate
from bench.sim.world import SimWorld, service_shape
from common.vocab import NodeInfo, Role
from placement.scheduler import in_band
from tests.fakes import DG_A, FaultyServe, Harness

DEMAND = (0.5, 2.0, 2.0, 4.0, 4.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, 3.0, 0.0, 0.0)  # decode instances' worth
CUTS = (Action.SCALE_IN, Action.TERMINATE_WITHDRAWN)


@dataclass
class Step:
    view: ClusterView  # before the step
    result: object
    after: ClusterView | None  # the world's view right after applying (None: the replay world)
    observation: object


@dataclass
class Kit:
    """A world, the config it runs under, and the driver that feeds it one demand level per step."""

    name: str
    world: object
    config: CycleConfig
    service: str
    feed: object  # (step index) -> now_s, after feeding that step's demand
    reflects: bool = True
    steps: list[Step] = field(default_factory=list)

    def run(self) -> list[Step]:
        """Every demand level through one step; right after each, the same actions applied once more."""
        state = PolicyState()
        for i in range(len(DEMAND)):
            now = self.feed(i)
            view = self.world.cluster_view(now)
            result, state, observation, _ = step(self.world, state, now, self.config)
            after = self.world.cluster_view(now) if self.reflects else None
            applied = [a for a in result.actions if not a.advisory]
            again = tuple(self.world.apply(applied, now))
            if self.reflects and not result.failed:
                assert not again and _shape(self.world.cluster_view(now), self.service) == \
                    _shape(after, self.service), (self.name, i, "applying the same actions again changed the world")
            elif not self.reflects:
                assert again == result.failed  # the replay world fails what failed when it was recorded
            self.steps.append(Step(view, result, after, observation))
        return self.steps


def sim_kit() -> Kit:
    rate = TraceRate(tuple(d * 1000 / 100 for d in DEMAND), 60.0)  # 1,000 tokens/s per decode instance
    svc = SimService("svc", rate, mean_input=300, mean_output=100, ttft_slo_s=2.0, tbt_slo_s=0.1,
                     prefill_gpu="H20", decode_gpu="H20", affinity="s1", startup_prefill_s=90.0,
                     startup_decode_s=150.0)  # roles Ready at different times: some replicas still starting
    nodes = tuple(NodeInfo(f"n{s}-{i}", "H20", 4, 4, f"s1-{s}", "s2-0") for s in range(3) for i in range(2))
    scenario = Scenario("contract", nodes, (svc,), 60.0 * len(DEMAND), tick_s=60.0, startup_s=120.0)
    world = SimWorld(scenario)
    policy = PolicyConfig(target_decode_tps_per_instance=1000.0, prefill_per_decode=0.5, max_prefill=40,
                          max_decode=40, scale_out_cooldown_s=0, scale_in_cooldown_s=0, soft_scale_in_window_s=60,
                          staleness_limit_s=90.0)
    config = CycleConfig(FleetConfig(services={"svc": policy}), {"svc": service_shape(svc)})
    result = PolicyResult()

    def feed(i: int) -> float:
        now = 60.0 * i
        world.advance(now)
        if i:
            world.serve(now - 60.0, result)
        return now

    return Kit("sim", world, config, "svc", feed)


def ray_kit() -> Kit:
    serve = FaultyServe()
    serve.deploy_group(None, DG_A, 0, "/m")
    serve.calls.clear()
    h = Harness(serve=serve)

    def feed(i: int) -> float:
        serve.stuck = i in (3, 4)  # replicas asked for then stay starting (not RUNNING) a while
        for _ in range(5):  # 10 s a step: four low steps outlast the 30 s soft scale-in window
            h.report(DEMAND[i] * 100 / max(len(h.replicas(Role.DECODE)), 1), dt=2.0)
        return h.clock.t

    return Kit("ray", h.ctl.world, h.ctl.config, "tiny-chat", feed)


def replay_kit() -> Kit:
    recorded = sim_kit()
    records = [(i * 60.0, s.observation, s.view, s.result.actions, s.result.failed)
               for i, s in enumerate(recorded.run())]
    return Kit("replay", ReplayWorld(records), recorded.config, "svc", lambda i: records[i][0], reflects=False)


KITS = {"sim": sim_kit, "ray": ray_kit, "replay": replay_kit}


@pytest.fixture(params=sorted(KITS))
def kit(request) -> Kit:
    return KITS[request.param]()


def _held(view: ClusterView, service: str) -> dict[str, tuple]:
    return {gs.name: gs for gs in view.groups.get(service, ())}


def test_a_step_cuts_only_on_a_scale_in_and_only_withdrawn_or_starting_replicas(kit):
    cut_steps = 0
    for s in kit.run():
        decision = s.result.decision.services[kit.service]
        held = _held(s.view, kit.service)
        for action in s.result.actions:
            before = held.get(action.group.name)
            if before is None:
                continue
            for role, counts, new in (("prefill", before.prefill, action.group.num_prefill),
                                      ("decode", before.decode, action.group.num_decode)):
                old = before.group.num_prefill if role == "prefill" else before.group.num_decode
                if new < old:
                    cut_steps += 1
                    assert decision.action in CUTS, (kit.name, decision.action, action)
                    assert old - new <= counts.withdrawn + counts.pending, (kit.name, role, counts, action)
    assert cut_steps, f"{kit.name}: the demand's fall never cut anything"


def test_every_group_holding_both_roles_stays_in_the_band(kit):
    ratio = kit.config.fleet.services[kit.service].prefill_per_decode
    for s in kit.run():
        for action in s.result.actions:
            g = action.group
            if action.kind is not GroupActionKind.REMOVE and g.num_prefill and g.num_decode:
                assert in_band(g.num_prefill, g.num_decode, ratio), (kit.name, g)


def test_apply_is_idempotent_and_the_view_shows_what_was_applied(kit):
    steps = kit.run()  # (idempotence is checked inside, right after each step)
    for s in steps:
        if s.after is None:
            continue
        held = _held(s.after, kit.service)
        failed = {a.group.name for a in s.result.failed}
        for a in s.result.actions:
            if a.advisory or a.group.name in failed:
                continue
            if a.kind is GroupActionKind.REMOVE:
                assert a.group.name not in held, (kit.name, a)
            else:
                got = held[a.group.name]
                assert (got.group.num_prefill, got.group.num_decode, got.prefill.withdrawn, got.decode.withdrawn) \
                    == (a.group.num_prefill, a.group.num_decode, a.withdrawn_prefill, a.withdrawn_decode), kit.name
    assert any(s.result.actions for s in steps)


def _shape(view: ClusterView, service: str) -> dict[str, tuple[int, int, int, int]]:
    return {n: (g.group.num_prefill, g.group.num_decode, g.prefill.withdrawn, g.decode.withdrawn)
            for n, g in _held(view, service).items()}


def test_missing_is_never_zero(kit):
    # before anything was served or reported, decode tokens/s is missing, not zero
    now = {"sim": 0.0, "ray": 1000.0, "replay": 0.0}[kit.name]
    observed = kit.world.observe(now).services[kit.service]  # (the replay world: what the simulated one saw)
    assert observed.decode_tps.value is None
