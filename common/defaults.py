"""One set of autoscaling defaults. The service file's `autoscaling` section (`common.config.AutoscalingSpec`),
the policy's frozen config (`autoscaler.model.PolicyConfig`) and the ready-ratio gate (`autoscaler.gating`)
take theirs from here, so a value left out means the same thing wherever it is read. They suit a small live
cluster (the local demo's scale: seconds-long cooldowns and windows); set them per service from a stress test
on real fleets (the simulator sets its own, `bench.sim.world.policy_config`). Part of the shared leaf: pure.
"""

from __future__ import annotations

from types import MappingProxyType

AUTOSCALING = MappingProxyType({
    "prefill_per_decode": 1.0,  # P:D that meets the SLOs: set it from a stress test (`heteroscale profile`)
    "min_prefill": 1,
    "max_prefill": 8,
    "min_decode": 1,
    "max_decode": 8,
    "hysteresis_band": 0.10,  # act when desired/current leaves [0.9, 1.1]
    "scale_out_cooldown_s": 15.0,
    "scale_in_cooldown_s": 60.0,  # also counted from the last scale-out
    "latency_cooldown_s": 30.0,  # repeated latency steps wait for new instances to start
    "max_step_fraction": 0.5,  # one proportional step changes a pool by <= 50 %
    "soft_scale_in_window_s": 30.0,  # observe the SLOs this long before terminating; 0 = at once
    "staleness_limit_s": 15.0,  # older signals count as missing: hold
    # adaptive P:D ratio (on when a prefill target is set): bounds, smoothing and hysteresis
    "ratio_range": 4.0,  # the ratio stays within [prefill_per_decode / this, prefill_per_decode x this]
    "ratio_window_s": 120.0,  # a falling ratio estimate follows the workload with this time constant
    "ratio_hysteresis": 0.15,  # the ratio in force moves when the estimate leaves +/- this share of it
    "forecast_bin_s": 300.0,  # the forecast's seasonal profile: one mean per bin of its period
    "ready_ratio_tolerance_instances": 1,  # ready-ratio gate: +/- this many instances ...
    "ready_ratio_tolerance_fraction": 0.2,  # ... or this share of the ideal count
})
