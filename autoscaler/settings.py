"""The service spec's `autoscaling` section as the policy's frozen config and the controller's settings.

Validated once: pydantic checks each field (`common.config.AutoscalingSpec`), then `PolicyConfig` checks the
rules between fields; either error names the field and the value, prefixed with `autoscaling.`.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoscaler.model import LatencyTier, Mode, PolicyConfig, ScheduleWindow
from autoscaler.supply import SupplyNodeType
from common.config import AutoscalingSpec, ConfigError, ServiceSpec


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller needs besides the policy: loop period, signal windows, gating, drain, log."""

    service: str
    control_period_s: float
    signal_window_s: float
    staleness_limit_s: float
    report_interval_s: float
    slo_quantile: float
    ready_ratio_tolerance_instances: int
    ready_ratio_tolerance_fraction: float
    graceful_shutdown_timeout_s: float
    probe_timeout_s: float
    serve_call_timeout_s: float
    deploy_timeout_s: float
    pending_timeout_s: float
    decision_log: str | None
    decision_log_max_mb: float
    advisory: bool
    signal_source: str = "push"
    prometheus_url: str | None = None
    node_supply: tuple[SupplyNodeType, ...] = ()  # node types the cluster autoscaler can add; () = never ask


def policy_config(spec: ServiceSpec) -> PolicyConfig:
    a = _section(spec)
    try:
        return PolicyConfig(
            target_decode_tps_per_instance=a.target_decode_tps_per_instance,
            prefill_per_decode=a.prefill_per_decode,
            min_prefill=a.min_prefill, max_prefill=a.max_prefill, min_decode=a.min_decode, max_decode=a.max_decode,
            hysteresis_band=a.hysteresis_band, scale_out_cooldown_s=a.scale_out_cooldown_s,
            scale_in_cooldown_s=a.scale_in_cooldown_s, max_step_fraction=a.max_step_fraction,
            tbt_slo_s=a.tbt_slo_s, ttft_slo_s=a.ttft_slo_s,
            latency_tiers=(LatencyTier(1.1, 0.10), LatencyTier(1.5, 0.20)),
            latency_cooldown_s=a.latency_cooldown_s, soft_scale_in_window_s=a.soft_scale_in_window_s,
            staleness_limit_s=a.staleness_limit_s, mode=Mode(a.mode),
            schedule=tuple(ScheduleWindow(w.start_s, w.end_s, w.total_instances, w.prefill_per_decode)
                           for w in a.schedule),
            advisory=a.advisory, target_prefill_tps_per_instance=a.target_prefill_tps_per_instance,
            ratio_range=a.ratio_range, ratio_window_s=a.ratio_window_s, ratio_hysteresis=a.ratio_hysteresis,
            forecast_period_s=a.forecast_period_s, forecast_bin_s=a.forecast_bin_s,
            burst_queue_per_decode=a.burst_queue_per_decode,
            gpus_per_prefill=spec.roles.prefill.gpus_per_replica, gpus_per_decode=spec.roles.decode.gpus_per_replica)
    except ValueError as err:
        raise ConfigError(f"{spec.source_path or spec.name}: autoscaling: {err}") from None


def controller_settings(spec: ServiceSpec) -> ControllerSettings:
    a = _section(spec)
    return ControllerSettings(
        service=spec.name, control_period_s=a.control_period_s, signal_window_s=a.signal_window_s,
        staleness_limit_s=a.staleness_limit_s, report_interval_s=a.report_interval_s, slo_quantile=a.slo_quantile,
        ready_ratio_tolerance_instances=a.ready_ratio_tolerance_instances,
        ready_ratio_tolerance_fraction=a.ready_ratio_tolerance_fraction,
        graceful_shutdown_timeout_s=spec.drain_timeout_s(), probe_timeout_s=a.probe_timeout_s,
        serve_call_timeout_s=a.serve_call_timeout_s, deploy_timeout_s=a.deploy_timeout_s,
        pending_timeout_s=a.pending_timeout_s,
        decision_log=a.decision_log, decision_log_max_mb=a.decision_log_max_mb, advisory=a.advisory,
        signal_source=a.signal_source, prometheus_url=a.prometheus_url,
        node_supply=tuple(SupplyNodeType(t.gpu_type, t.num_gpus, t.s1, t.s2, t.max_nodes)
                          for t in (a.node_supply.node_types if a.node_supply else ())))


def check(spec: ServiceSpec) -> None:
    """Every autoscaling rule, the ones between fields included, before anything is deployed (`heteroscale
    validate` and `deploy` call it): raises ConfigError naming the field and the value."""
    if spec.autoscaling is not None and spec.autoscaling.enabled:
        policy_config(spec)
        controller_settings(spec)


def _section(spec: ServiceSpec) -> AutoscalingSpec:
    if spec.autoscaling is None:
        raise ConfigError(f"{spec.source_path or spec.name}: the service has no `autoscaling` section")
    return spec.autoscaling
