"""The live controller's promises under faults (issue 21): a hypothesis state machine interleaves load, report
gaps, probe failures, failing Serve calls, replicas stuck starting and a lost policy state with control ticks
of the real controller and RayWorld over a fake Serve (no Ray), and checks after every tick:
- nothing shrinks unless the tick decided a scale-in or a termination, or cancelled a group's stuck replicas
  (never started within `pending_timeout_s`); a termination removes only replicas its group had withdrawn
  (or never started), a scale-in cuts of a group's role only replicas it has starting;
- every deployment group holding both roles is inside the ratio band;
- missing data is never zero: after a gap in the reports decode tokens/s is missing, and the policy holds;
- the policy's state holds what happened: outside a soft scale-in its targets are what the groups hold.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from autoscaler.model import PolicyState
from common.vocab import Role
from placement.scheduler import in_band
from tests.fakes import DG_A, SERVICE, FaultyServe, Harness

RATIO = 1.0  # the harness's service (tests.fakes.spec)


class LiveController(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.serve = FaultyServe()
        self.serve.deploy_group(None, DG_A, 0, "/m")
        self.serve.calls.clear()
        self.h = Harness(serve=self.serve, pending_timeout_s=10)  # stuck for two ticks: cancelled
        self.ticks = 0

    def _tick(self, reports: int, tps: float):
        world = self.h.ctl.world
        before = self.serve.snapshot()
        withdrawn = {name: dict(r.withdrawn) for name, r in world.records.items()}
        for _ in range(reports):
            self.h.report(tps)
        if not reports:
            self.h.clock.t += 20.0  # a gap: no replica or ingress report for longer than the window
        entry = self.h.ctl.tick()
        assert entry is not None, self.h.ctl.errors
        self.ticks += 1
        after = self.serve.snapshot()
        cuts = {key: before[key][0] - after.get(key, (0, 0))[0] for key in before
                if after.get(key, (0, 0))[0] < before[key][0]}
        stuck = {a["group"] for a in entry["actions"] if a["why"] == "stuck"}  # cancelled: never started in time
        for (app, dep), n in cuts.items():
            group, role = app.split("--", 1)[1], Role(dep.rsplit(":", 1)[1])
            never_started = before[(app, dep)][0] - before[(app, dep)][1]
            if group in stuck:
                assert n <= never_started, (app, dep, n, before)
                continue
            assert entry["action"] in ("scale_in", "terminate_withdrawn"), (entry["action"], cuts)
            if entry["action"] == "terminate_withdrawn":  # per group: only what it had withdrawn
                assert n <= withdrawn.get(group, {}).get(role, 0) + never_started, (app, dep, n)
            else:  # a scale-in's cancel of starting replicas: per group, never more than it has starting
                assert n <= never_started, (app, dep, n, before)
        for record in world.records.values():
            g = record.group
            if g.num_prefill and g.num_decode:
                assert in_band(g.num_prefill, g.num_decode, RATIO), g
        status = self.h.ctl.state.services.get(SERVICE)
        if status is not None and status.soft is None:
            held = (sum(r.group.num_prefill for r in world.records.values()),
                    sum(r.group.num_decode for r in world.records.values()))
            assert (status.target_prefill, status.target_decode) == held, (entry["action"], entry["failed"])
        return entry

    @rule(tps=st.sampled_from([0.0, 20.0, 60.0, 120.0, 180.0, 400.0]))
    def load(self, tps):
        self._tick(5, tps)

    @rule()
    def report_gap(self):
        entry = self._tick(0, 0.0)
        assert entry["observation"]["decode_tps"] is None  # missing, never zero
        assert entry["action"] in ("hold", "restore", "scale_out"), entry["action"]  # never a cut

    @rule(fits=st.booleans())
    def probes_fit(self, fits):
        self.serve.fits = fits

    @rule(fail=st.booleans())
    def serve_calls_fail(self, fail):
        self.serve.fail_calls = fail

    @rule(stuck=st.booleans())
    def replicas_stick(self, stuck):
        self.serve.stuck = stuck

    @rule()
    def lose_state(self):
        self.h.ctl.state = PolicyState()  # an unreadable saved state: the policy starts from the view


TestLiveController = LiveController.TestCase
TestLiveController.settings = settings(max_examples=200, stateful_step_count=12, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
