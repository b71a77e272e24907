"""Performance model: known roofline cases, KV capacity and transfer, utilization shapes."""

import pytest

from bench.sim.perf_model import (
    GPUS,
    MODELS,
    Instance,
    kv_transfer_time_s,
    nvml_utilization,
    saturation_decode_tps,
)

LLAMA8, LLAMA70 = MODELS["llama-8b"], MODELS["llama-70b"]


def test_model_shapes_match_published_parameter_counts():
    assert LLAMA8.params == pytest.approx(8.0e9, rel=0.02)
    assert LLAMA70.params == pytest.approx(70.6e9, rel=0.02)
    assert LLAMA8.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token


def test_decode_is_memory_bound_and_prefill_compute_bound():
    inst = Instance(GPUS["H100"], LLAMA8)
    step, compute_frac = inst.decode_step_time_s([1000] * 8)
    weights_time = LLAMA8.weight_bytes / (3.35e12 * 0.75)
    assert step == pytest.approx(weights_time + 8000 * LLAMA8.kv_bytes_per_token / (3.35e12 * 0.75) + 0.004)
    assert compute_frac < 0.1
    prefill, compute_frac = inst.prefill_time_s([4096])
    assert compute_frac > 0.9
    assert prefill == pytest.approx((2 * LLAMA8.params * 4096 + 4 * 32 * 4096 * 4096 * 4097 / 2)
                                    / (989e12 * 0.55) + 0.004, rel=1e-6)


def test_heterogeneous_gpus_favour_their_roles():
    """H20 (bandwidth-rich) decodes faster than L20; per unit cost L20 prefills cheaper than H20 (paper §5.1)."""
    h20, l20 = Instance(GPUS["H20"], LLAMA8), Instance(GPUS["L20"], LLAMA8)
    assert h20.decode_tps(32, 2000) > 3 * l20.decode_tps(32, 2000)
    cost_per_prefill = {g.gpu.name: g.prefill_time_s([2048])[0] * g.gpu.relative_cost for g in (h20, l20)}
    assert cost_per_prefill["L20"] < cost_per_prefill["H20"]


def test_kv_capacity_and_fit_errors():
    assert Instance(GPUS["H20"], LLAMA8).kv_capacity_tokens() == pytest.approx(
        (96e9 * 0.9 - LLAMA8.weight_bytes) / LLAMA8.kv_bytes_per_token, abs=1)
    with pytest.raises(ValueError, match="does not fit on 1x L20"):
        Instance(GPUS["L20"], LLAMA70)
    assert Instance(GPUS["H20"], LLAMA70, tp=2).kv_capacity_tokens() > 0


def test_kv_transfer_is_20_percent_slower_across_domains():
    inside = kv_transfer_time_s(LLAMA8, 2048, GPUS["H20"])
    across = kv_transfer_time_s(LLAMA8, 2048, GPUS["H20"], cross_domain=True)
    assert inside == pytest.approx(2048 * LLAMA8.kv_bytes_per_token / 50e9)
    assert across == pytest.approx(inside / 0.8)


def test_decode_gpu_util_saturates_while_sm_activity_stays_low():
    inst = Instance(GPUS["H20"], LLAMA8)
    _, light = inst.decode_step_time_s([500] * 2)
    _, heavy = inst.decode_step_time_s([500] * 64)
    util_light, sm_light = nvml_utilization(1.0, light)  # any running request keeps kernels running
    util_heavy, sm_heavy = nvml_utilization(1.0, heavy)
    assert util_light == util_heavy == 1.0
    assert sm_light < 0.1 and sm_heavy > sm_light


def test_saturation_tps_respects_the_tbt_slo():
    inst = Instance(GPUS["H20"], LLAMA8)
    tight, loose = saturation_decode_tps(inst, 2000, 0.02), saturation_decode_tps(inst, 2000, 0.05)
    assert 0 < tight < loose
