"""`autoscaler.frozen.evolve` is `dataclasses.replace` for the cycle's frozen value types, and refuses the rest."""

import dataclasses

import pytest

from autoscaler.forecast import Profile
from autoscaler.frozen import evolve
from autoscaler.model import Diagnostics, PolicyConfig, ServiceState, SoftScaleIn


def test_evolve_equals_replace_and_leaves_the_original_alone():
    st = ServiceState(target_prefill=3, target_decode=2, soft=SoftScaleIn(5.0, 3, 2, 2, 1))
    new = evolve(st, target_decode=4, last_scale_out_s=7.0)
    assert new == dataclasses.replace(st, target_decode=4, last_scale_out_s=7.0)
    assert hash(new) == hash(dataclasses.replace(st, target_decode=4, last_scale_out_s=7.0))
    assert (st.target_decode, st.last_scale_out_s) == (2, None)
    assert new.soft is st.soft
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.target_decode = 9
    profile = Profile.empty(86_400.0, 300.0, 0.0).observe(60.0, 12.5)
    assert evolve(profile, error=0.2) == dataclasses.replace(profile, error=0.2)


def test_evolve_names_an_unknown_field():
    with pytest.raises(TypeError, match="no field 'nope'"):
        evolve(Diagnostics(), nope=1)


def test_evolve_refuses_a_type_whose_init_checks_or_derives():
    with pytest.raises(TypeError, match="__post_init__"):
        evolve(PolicyConfig(target_decode_tps_per_instance=100.0), min_decode=2)
