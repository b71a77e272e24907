import pytest

from autoscaler.gating import BOTH, admitted_roles
from autoscaler.model import Role


@pytest.mark.parametrize("ready_p, ready_d, ratio, expected", [
    (2, 6, 1 / 3, BOTH),  # on ratio
    (3, 6, 1 / 3, BOTH),  # +1 prefill is within the instance tolerance
    (4, 6, 1 / 3, {Role.DECODE}),  # prefill ahead by 2: only decode may join
    (2, 0, 1 / 3, {Role.DECODE}),  # a new DG whose prefill came up first
    (0, 3, 1 / 3, {Role.PREFILL}),  # decode came up first
    (1, 5, 1 / 3, {Role.PREFILL}),  # decode ahead of 3 by 2
    (10, 30, 1 / 3, BOTH),
    (10, 36, 1 / 3, BOTH),  # +6 decode is within 20 % of 30
    (10, 37, 1 / 3, {Role.PREFILL}),
    (0, 0, 1 / 3, BOTH),
])
def test_ready_ratio_gating(ready_p, ready_d, ratio, expected):
    assert admitted_roles(ready_p, ready_d, ratio) == frozenset(expected)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"prefill -1"):
        admitted_roles(-1, 2, 0.5)
    with pytest.raises(ValueError, match=r"prefill_per_decode \(0\)"):
        admitted_roles(1, 2, 0)
