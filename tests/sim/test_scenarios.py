"""Scenario files: service classes, size distributions, log-uniform rates, errors that name the problem, and
paper-fleet's shape (a fleet of the paper's size in use, not only in capacity)."""

import pytest

from bench.sim.scenarios import lognormal_sizes, scenario_from_dict
from tests.conftest import ROOT

BASE = {"name": "t", "duration_s": 3600, "tick_s": 60, "startup_s": 120,
        "topology": {"generator": {"s2": 1, "s1_per_s2": 2, "nodes_per_s1": 2, "gpus_per_node": 8,
                                   "types": ["H20", "L20"]}}}
CLASS = {"count": 5, "seed": 1, "mean_rps": [0.5, 500], "peak_to_trough": [2, 3], "mean_input": 800,
         "mean_output": 100, "ttft_slo_s": 2.0, "tbt_slo_s": 0.05, "day_s": 3600}


def scenario(*classes):
    return scenario_from_dict({**BASE, "services": {"classes": list(classes)}}, ROOT)


def test_classes_with_their_own_models_sizes_and_log_uniform_rates():
    sc = scenario({**CLASS, "prefix": "small", "rps_scale": "log"},
                  {**CLASS, "prefix": "big", "model": "llama-70b", "tp_prefill": 4, "tp_decode": 2,
                   "prefill_gpu": "H20", "sizes_lognormal": {"seed": 2, "count": 2000}})
    small = [s for s in sc.services if s.name.startswith("small-")]
    big = [s for s in sc.services if s.name.startswith("big-")]
    assert len(small) == len(big) == 5
    assert all(0.5 <= s.shape.mean_rps <= 500 for s in small)
    assert max(s.shape.mean_rps for s in small) / min(s.shape.mean_rps for s in small) > 5  # spread in log
    assert all((s.tp_prefill, s.tp_decode, s.model, s.prefill_gpu) == (4, 2, "llama-70b", "H20") for s in big)
    sizes = big[0].sizes
    assert len(sizes) > 10 and abs(sum(w for _, _, w in sizes) - 1) < 1e-9
    rows = lognormal_sizes(seed=2, count=2000)
    assert big[0].mean_input == round(sum(r[0] for r in rows) / len(rows))  # means from the distribution
    assert small[0].sizes == ()  # no distribution given: the means alone


@pytest.mark.parametrize("bad, match", [
    ({"rps_scale": "cubic"}, r"rps_scale \('cubic'\)"),
    ({"mean_rps": [0, 5]}, r"mean_rps \(\[0, 5\]\)"),
    ({"sizes_lognormal": {}, "sizes_from": {"path": "x.csv"}}, "one of sizes_from and sizes_lognormal"),
])
def test_bad_classes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        scenario({**CLASS, **bad})


def test_repeated_service_names_are_refused():
    with pytest.raises(ValueError, match="give each class its own prefix"):
        scenario(CLASS, CLASS)


def test_paper_fleet_is_the_papers_size_in_use():
    from collections import Counter

    from bench.sim.baselines import run_oracle
    from bench.sim.scenarios import load_scenario
    from placement.topology import Tier, build_tree

    if not (ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv").exists():
        pytest.skip("shared/traces not beside this checkout")
    sc = load_scenario(ROOT / "bench" / "scenarios" / "paper-fleet.yaml")
    assert {s.model for s in sc.services} == {"llama-8b", "llama-70b"}
    assert {(s.tp_prefill, s.tp_decode) for s in sc.services} >= {(1, 1), (4, 2), (4, 4)}
    assert {s.prefill_gpu for s in sc.services} == {s.decode_gpu for s in sc.services} == {"H20", "L20"}
    tiers = Counter(d.tier for (scope, _), d in build_tree(sc.nodes).domains.items() if scope == "s2")
    assert set(tiers) == {Tier.LOW, Tier.MEDIUM, Tier.HIGH}  # all three RDMA-subgroup kinds
    oracle = run_oracle(sc)
    peak = max(row[0] for row in oracle.per_tick.values())
    assert peak >= 10_000  # GPUs allocated at the daily peak, by the fewest instances that meet the SLOs
    sizes = sorted(sum(v for v in oracle.by_service[s.name][:1]) for s in sc.services)
    assert sizes[0] < 24 * 2 * 1.5 and sizes[-1] > 100 * 24  # from ~1 instance per role to hundreds


def test_an_empty_file_zero_tick_and_other_bad_values_are_named(tmp_path):
    from bench.sim.scenarios import load_scenario

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="a scenario is a mapping .* \\(got NoneType\\)"):
        load_scenario(empty)
    base = {**BASE, "services": {"classes": [CLASS]}}
    for key, value, match in (("tick_s", 0, r"tick_s \(0\) must be a number > 0"),
                              ("duration_s", float("nan"), r"duration_s \(nan\)"),
                              ("duration_s", 10**9, "is over 1,000,000 ticks")):
        with pytest.raises(ValueError, match=match):
            scenario_from_dict({**base, key: value}, ROOT)
    with pytest.raises(ValueError, match=r"types \(\['B200x'\]\)"):
        scenario_from_dict({**base, "topology": {"generator": {**BASE["topology"]["generator"], "types": ["B200x"]}}},
                           ROOT)
    with pytest.raises(ValueError, match="model \\('gpt-9'\\)"):
        scenario({**CLASS, "model": "gpt-9"})


def test_any_scenario_mapping_gives_a_scenario_or_one_named_error():
    """Property: whatever the YAML holds, loading ends quickly with a Scenario or a ValueError (never another
    exception, never an endless loop)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from bench.sim.model import Scenario

    junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**7), st.floats(allow_nan=True),
                     st.text(max_size=6), st.lists(st.integers(-2, 4), max_size=3))
    number = st.one_of(st.integers(-2, 40), st.floats(-1, 1e4), junk)
    gen = st.fixed_dictionaries({}, optional={
        "s2": number, "s1_per_s2": number, "nodes_per_s1": number, "gpus_per_node": number,
        "types": st.one_of(st.just(["H20", "L20"]), st.lists(st.sampled_from(["H20", "L20", "X"]), max_size=3), junk)})
    svc = st.fixed_dictionaries({}, optional={
        "count": number, "seed": number, "mean_rps": st.one_of(st.just([0.5, 5]), st.lists(number, max_size=3), junk),
        "peak_to_trough": st.one_of(st.just([2, 3]), st.lists(number, max_size=3), junk),
        "mean_input": number, "mean_output": number, "ttft_slo_s": number, "tbt_slo_s": number, "day_s": number,
        "model": st.one_of(st.just("llama-8b"), junk), "rps_scale": st.one_of(st.just("log"), junk),
        "tp_prefill": number, "tp_decode": number, "prefix": st.text(min_size=1, max_size=4)})
    doc = st.one_of(junk, st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.just("s"), junk), "duration_s": number, "tick_s": number, "startup_s": number,
        "topology": st.one_of(st.fixed_dictionaries({"generator": gen}), junk),
        "services": st.one_of(st.fixed_dictionaries({}, optional={"generator": svc, "classes": st.lists(svc, max_size=2)}),
                              junk),
        "extra": junk}))

    @settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
    @given(doc)
    def check(data):
        try:
            assert isinstance(scenario_from_dict(data, ROOT), Scenario)
        except ValueError:
            pass

    check()
