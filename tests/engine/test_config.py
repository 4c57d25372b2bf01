import pytest

from app.scen import ScenConfig


def test_overrides_are_typed():
    cfg = ScenConfig.from_overrides(["layer=20", "theta=0.7", "expert=lowrank", "expert-max-steps=5"])
    assert (cfg.layer, cfg.theta, cfg.expert, cfg.expert_max_steps) == (20, 0.7, "lowrank", 5)
    assert ScenConfig.from_overrides(["layer=none"]).layer is None


@pytest.mark.parametrize(
    ("item", "message"),
    [("nope=1", "bad setting 'nope=1'"), ("theta", "bad setting"), ("theta=high", "bad value for theta"),
     ("expert=huge", "expected one of")],
)
def test_bad_overrides_name_the_problem(item, message):
    with pytest.raises(ValueError, match=message):
        ScenConfig.from_overrides([item])
