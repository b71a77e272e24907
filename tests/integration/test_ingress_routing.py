"""PDIngress routing across deployment groups, with fake deployment handles (no Ray)."""

import asyncio

import pytest

from common.wire import RoutingEntry
from serving.ingress import PDIngress
from serving.openai_http import with_idle_timeout

CARD = {"id": "m", "object": "model", "owned_by": "me", "permission": [], "metadata": {}}


class FakeMethod:
    def __init__(self, group, gate):
        self.group, self.gate = group, gate

    def remote(self, body, info):
        async def gen():
            await self.gate.wait()
            yield f"{self.group}:{body.prompt}"
        return gen()


class FakeHandle:
    def __init__(self, group, gate):
        self.completions = FakeMethod(group, gate)

    def options(self, **kwargs):
        return self


class Body:
    model = "m"

    def __init__(self, prompt):
        self.prompt = prompt


def make_ingress(groups, gate, weights=None, **kwargs):
    weights = weights or {}
    table = {g: RoutingEntry(f"app-{g}", f"{g}:decode", weights.get(g, 1)) for g in groups}
    return PDIngress(table, CARD, request_timeout_s=5, stream_idle_timeout_s=5,
                     handles={g: FakeHandle(g, gate) for g in groups}, **kwargs)


async def _collect(ingress, prompt):
    return [c async for c in ingress._get_response(body=Body(prompt), call_method="completions")]


def test_least_in_flight_spreads_requests_and_counts_return_to_zero():
    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a", "b", "c"], gate)
        tasks = [asyncio.create_task(_collect(ingress, i)) for i in range(6)]
        await asyncio.sleep(0.05)
        assert ingress._inflight == {"a": 2, "b": 2, "c": 2}
        gate.set()
        results = await asyncio.gather(*tasks)
        assert sorted(r[0].split(":")[0] for r in results) == ["a", "a", "b", "b", "c", "c"]
        assert ingress._inflight == {"a": 0, "b": 0, "c": 0}
        assert (await ingress.routing_stats())["routed"] == {"a": 2, "b": 2, "c": 2}

    asyncio.run(main())


def test_withdrawn_groups_get_no_new_requests_and_none_left_is_503_with_retry_after():
    import json

    async def main():
        gate = asyncio.Event()
        gate.set()
        ingress = make_ingress(["a", "b"], gate, retry_after_s=4)
        await ingress.set_withdrawn(["a"])
        results = [await _collect(ingress, i) for i in range(4)]
        assert all(r[0].startswith("b:") for r in results)
        with pytest.raises(ValueError, match=r"unknown deployment groups \['z'\]"):
            await ingress.set_withdrawn(["z"])
        await ingress.set_withdrawn(["a", "b"])  # nothing serves (a service scaled to zero): refused at once
        refused = await ingress._process_llm_request(Body("x"), "completions")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "4"
        error = json.loads(refused.body)["error"]
        assert error["type"] == "service_unavailable" and "no deployment group serving" in error["message"]
        assert ingress._ingress_report()["shed"] == 1  # counted as demand the controller did not serve
        assert (await ingress.health()).status_code == 503
        await ingress.set_withdrawn([])  # the controller's table: one group withdrawn whole, the other starting
        ingress._set_table({"a": RoutingEntry("app-a", "a:decode", 0.0, withdrawn=True),
                            "b": RoutingEntry("app-b", "b:decode", 0.0, starting=True)})
        refused = await ingress._process_llm_request(Body("y"), "completions")
        assert refused.status_code == 503  # at once, not held until a replica starts (minutes) and timed out
        ingress._set_table({g: RoutingEntry(f"app-{g}", f"{g}:decode", 1.0) for g in ("a", "b")})
        assert (await ingress.health()).status_code == 200

    asyncio.run(main())


def test_unknown_model_is_404_before_routing():
    from fastapi import HTTPException

    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a"], gate)
        body = Body("x")
        body.model = "other"
        with pytest.raises(HTTPException) as err:
            await _collect_body(ingress, body)
        assert err.value.status_code == 404 and ingress._routed == {"a": 0}

    async def _collect_body(ingress, body):
        return [c async for c in ingress._get_response(body=body, call_method="completions")]

    asyncio.run(main())


def test_idle_stream_ends_with_an_error_event():
    async def main():
        async def slow():
            yield "data: 1\n\n"
            await asyncio.sleep(10)
            yield "data: never\n\n"

        chunks = [c async for c in with_idle_timeout(slow(), 0.05)]
        assert chunks[0] == "data: 1\n\n" and "idle timeout" in chunks[1] and len(chunks) == 2

    asyncio.run(main())


def test_a_stream_whose_replica_dies_ends_with_an_error_event_not_a_cut():
    async def main():
        async def dying():
            yield "data: 1\n\n"
            raise RuntimeError("ActorDiedError: the decode replica died")  # what a killed replica's handle raises

        chunks = [c async for c in with_idle_timeout(dying(), 5)]
        assert chunks[0] == "data: 1\n\n" and '"code": 502' in chunks[1] and chunks[2] == "data: [DONE]\n\n"

    asyncio.run(main())


def test_groups_are_weighted_by_routable_decode_replicas_and_weight_zero_gets_nothing():
    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a", "b", "c"], gate, weights={"a": 3, "b": 1, "c": 0})
        tasks = [asyncio.create_task(_collect(ingress, i)) for i in range(8)]
        await asyncio.sleep(0.05)
        assert ingress._inflight == {"a": 6, "b": 2, "c": 0}  # 3:1, and a DG with no routable decode: none
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_when_no_group_has_a_routable_decode_replica_all_share_alike_instead_of_a_503():
    """Serve's controller restarting lists live replicas as recovering: the table says weight 0 everywhere for a
    moment, but the replicas still serve; a withdrawn DG stays out."""
    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a", "b", "c"], gate, weights={"a": 0, "b": 0, "c": 0})
        await ingress.set_withdrawn(["c"])
        tasks = [asyncio.create_task(_collect(ingress, i)) for i in range(4)]
        await asyncio.sleep(0.05)
        assert ingress._inflight == {"a": 2, "b": 2, "c": 0}
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_new_routing_table_adds_and_removes_groups_at_run_time():
    async def main():
        gate = asyncio.Event()
        gate.set()
        ingress = make_ingress(["a"], gate)
        ingress._given_handles["b"] = FakeHandle("b", gate)
        ingress._set_table({"b": RoutingEntry("app-b", "b:decode", 1)})
        results = [await _collect(ingress, i) for i in range(3)]
        assert all(r[0].startswith("b:") for r in results) and set(ingress._groups) == {"b"}
        stats = await ingress.routing_stats()
        assert stats["groups"]["b"]["app"] == "app-b" and "a" not in stats["routed"]  # nothing ran on it: gone

    asyncio.run(main())


def test_admission_control_sheds_beyond_each_groups_bound_with_429_and_retry_after():
    import json

    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a", "b"], gate, weights={"a": 2, "b": 1}, max_inflight_per_decode_replica=2,
                               retry_after_s=2.5)
        held = [asyncio.create_task(_collect(ingress, i)) for i in range(6)]  # bounds: a 2x2 = 4, b 1x2 = 2
        await asyncio.sleep(0.05)
        assert ingress._inflight == {"a": 4, "b": 2}
        shed = await ingress._process_llm_request(Body("x"), "completions")
        assert shed.status_code == 429 and shed.headers["retry-after"] == "3"
        error = json.loads(shed.body)["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == 429 and "bound of 2" in error["message"]
        report = ingress._ingress_report()
        assert (report["admitted"], report["shed"]) == (6, 1)  # the controller counts the shed one as demand
        gate.set()
        await asyncio.gather(*held)
        assert ingress._inflight == {"a": 0, "b": 0}
        assert await _collect(ingress, "again")  # room again: admitted

    asyncio.run(main())
    with pytest.raises(ValueError, match=r"max_inflight_per_decode_replica \(0\) must be >= 1"):
        make_ingress(["a"], asyncio.Event(), max_inflight_per_decode_replica=0)


def test_a_removed_group_s_counts_and_series_go_once_its_requests_end():
    """The ingress kept the per-DG series (in-flight, routed, TTFT) and the TTFT histogram of every DG ever
    removed; now they go when its last in-flight request ends, and the admitted total stays monotonic."""
    from serving.ingress import _INFLIGHT, _ROUTED

    def series(group):
        return [s for m in (*_ROUTED.collect(), *_INFLIGHT.collect()) for s in m.samples
                if s.labels.get("service") == "gone-test" and s.labels.get("deployment_group") == group]

    async def main():
        gate = asyncio.Event()
        ingress = make_ingress(["a", "b"], gate, service="gone-test")
        running = [asyncio.create_task(_collect(ingress, i)) for i in range(2)]
        await asyncio.sleep(0.05)
        assert ingress._inflight == {"a": 1, "b": 1} and series("b")
        ingress._set_table({"a": RoutingEntry("app-a", "a:decode", 1)})
        assert ingress._inflight["b"] == 1  # its request still runs: nothing is dropped under it
        gate.set()
        await asyncio.gather(*running)
        assert set(ingress._inflight) == set(ingress._routed) == set(ingress._ttft_hist) == {"a"}
        assert not series("b") and series("a")
        assert ingress._ingress_report()["admitted"] == 2

    asyncio.run(main())
