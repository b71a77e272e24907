"""The metric study over a day (`bench.sim.study.signal_quality`): targets from the tuning day, sizes read on
the scoring day; where the mix or the prefix-cache share moves, only the KV-miss prefill signal keeps sizing
prefill to its need."""

from __future__ import annotations

import pytest

from bench.sim.scenarios import load_scenario
from bench.sim.study import signal_quality
from tests.conftest import ROOT

SUITE = ROOT / "bench" / "scenarios" / "suite"


@pytest.fixture(scope="module")
def mix_drift():
    return signal_quality(load_scenario(SUITE / "mix-drift.yaml"), stride=60)


@pytest.fixture(scope="module")
def prefix_reuse():
    return signal_quality(load_scenario(SUITE / "prefix-reuse.yaml"), stride=60)


def test_prefill_sized_from_decode_tokens_misses_its_need_when_the_mix_moves(mix_drift):
    s = mix_drift["signals"]
    assert mix_drift["tuning_day"] != mix_drift["scoring_day"]
    assert s["prefill:decode_tps"]["under_10pct"] > 0.1 and s["prefill:decode_tps"]["over_10pct"] > 0.1
    kv = s["prefill:kv_miss_prefill_tps"]
    assert kv["under_10pct"] + kv["over_10pct"] < 0.05
    assert 0.9 < kv["size_over_need_p10"] <= kv["size_over_need_p90"] < 1.1


def test_all_prompt_tokens_oversize_prefill_when_the_prefix_cache_share_moves(prefix_reuse):
    s = prefix_reuse["signals"]
    prompt, kv = s["prefill:prompt_tps"], s["prefill:kv_miss_prefill_tps"]
    assert prompt["under_10pct"] + prompt["over_10pct"] > 0.1
    assert kv["under_10pct"] + kv["over_10pct"] < prompt["under_10pct"] + prompt["over_10pct"]
    assert set(s) == {"decode:decode_tps", "decode:decode_gpu_util", "prefill:kv_miss_prefill_tps",
                      "prefill:prompt_tps", "prefill:decode_tps", "prefill:prefill_gpu_util"}
