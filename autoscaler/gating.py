"""Ready-ratio registration gating (paper §6): while the Ready prefill:decode ratio deviates from the configured
one beyond a tolerance, new replicas of the over-represented role wait before joining routing.

Pure: no Ray, no clock, no environment.
"""

from __future__ import annotations

from common.defaults import AUTOSCALING as DEFAULTS
from common.vocab import Role

BOTH = frozenset({Role.PREFILL, Role.DECODE})


def admitted_roles(ready_prefill: int, ready_decode: int, prefill_per_decode: float,
                   tolerance_instances: int = DEFAULTS["ready_ratio_tolerance_instances"],
                   tolerance_fraction: float = DEFAULTS["ready_ratio_tolerance_fraction"]) -> frozenset[Role]:
    """Roles whose newly Ready replicas may join routing now.

    Tolerance (assumed default, paper gives none): +/- `tolerance_instances` or +/- `tolerance_fraction` of the
    ideal count, whichever is looser. Already-routed replicas are never removed by this rule.
    """
    if ready_prefill < 0 or ready_decode < 0:
        raise ValueError(f"ready counts must be >= 0 (prefill {ready_prefill}, decode {ready_decode})")
    if prefill_per_decode <= 0:
        raise ValueError(f"prefill_per_decode ({prefill_per_decode}) must be > 0")
    ideal_prefill = ready_decode * prefill_per_decode
    if ready_prefill - ideal_prefill > max(tolerance_instances, tolerance_fraction * ideal_prefill):
        return frozenset({Role.DECODE})  # prefill is ahead: let decode catch up first
    ideal_decode = ready_prefill / prefill_per_decode
    if ready_decode - ideal_decode > max(tolerance_instances, tolerance_fraction * ideal_decode):
        return frozenset({Role.PREFILL})
    return BOTH
