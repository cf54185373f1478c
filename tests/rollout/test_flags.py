"""Feature flags: rules, percentages, and users who stay in their arm as the percentage
grows; and the same property for the router's weighted version assignment under the
controller's canary steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout import Controller, Flag, ManualClock, RolloutError, bucket, evaluate
from rollout.config import DEFAULT_STEPS

keys = st.text(min_size=1, max_size=20)
pcts = st.floats(min_value=0, max_value=100, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(key=keys, a=pcts, b=pcts, name=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True))
def test_users_stay_on_as_the_percentage_grows(key, a, b, name):
    lo, hi = sorted((a, b))
    if evaluate(Flag(name, lo), key, namespace="demo"):
        assert evaluate(Flag(name, hi), key, namespace="demo")


def test_percentage_splits_keys_and_arms_are_independent():
    ks = [f"user-{i}" for i in range(20000)]
    on = [k for k in ks if evaluate(Flag("new-template", 30), k, namespace="demo")]
    assert 0.28 < len(on) / len(ks) < 0.32
    other = sum(evaluate(Flag("other", 30), k, namespace="demo") for k in on)
    assert 0.27 < other / len(on) < 0.33  # a different flag is not the same 30 percent
    canary = sum(bucket("demo", k) < 0.3 for k in on)  # nor the canary's
    assert 0.27 < canary / len(on) < 0.33


def test_rules_disabled_flags_and_missing_keys():
    f = Flag("eu-beta", 100, [{"attribute": "region", "op": "in", "value": ["eu-west", "eu-north"]},
                              {"attribute": "tier", "op": "ne", "value": "free"},
                              {"attribute": "age_days", "op": "gte", "value": 30}])
    assert evaluate(f, "u", {"region": "eu-west", "tier": "pro", "age_days": "31"})
    assert not evaluate(f, "u", {"region": "us-east", "tier": "pro", "age_days": 31})
    assert not evaluate(f, "u", {"region": "eu-west", "tier": "free", "age_days": 31})
    assert not evaluate(f, "u", {"region": "eu-west", "tier": "pro", "age_days": "new"})
    assert evaluate(Flag("x", 100), "")  # 100 percent needs no key
    assert not evaluate(Flag("x", 99.9), "")  # below it, no key is off
    assert not evaluate(Flag("x", 100, enabled=False), "u")
    assert evaluate(Flag("x", 100, [{"attribute": "ua", "op": "matches", "value": "curl/.*"}]), "u", {"ua": "curl/8"})


@pytest.mark.parametrize("flag, field", [
    ({"name": "f", "percentage": 101}, "flags.f.percentage"),
    ({"name": "f", "percentage": -1}, "flags.f.percentage"),
    ({"name": "bad name", "percentage": 5}, "flag.name"),
    ({"name": "f", "percentage": 5, "rules": [{"attribute": "a", "op": "like", "value": 1}]}, "flags.f.rules[0].op"),
    ({"name": "f", "percentage": 5, "rules": [{"attribute": "a", "op": "gt", "value": "x"}]}, "flags.f.rules[0].value"),
    ({"name": "f", "percentage": 5, "rules": [{"attribute": "a", "op": "matches", "value": "("}]},
     "flags.f.rules[0].value"),
    ({"name": "f", "percentage": 5, "enabled": "false"}, "flags.f.enabled"),
])
def test_bad_flags_name_the_field(flag, field):
    c = Controller(ManualClock())
    c.register("demo", "v1")
    with pytest.raises(RolloutError) as e:
        c.set_flag("demo", flag)
    assert e.value.field == field


def test_flags_go_through_the_controller_and_survive_a_restart():
    c = Controller(ManualClock())
    c.register("demo", "v1")
    d = c.set_flag("demo", {"name": "f", "percentage": 10})
    assert d.flags == {"f": {"name": "f", "percentage": 10, "enabled": True, "rules": []}}
    r = Controller.from_records([d.to_dict()])
    assert r.set_flag("demo", Flag("f", 20)).flags["f"]["percentage"] == 20
    assert r.remove_flag("demo", "f").flags == {}


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=6),
                      min_size=3, max_size=3, unique=True),
       other=st.floats(min_value=0, max_value=0.3), seed=st.integers(0, 2**32 - 1))
def test_router_keeps_canary_users_on_the_canary_as_its_weight_grows(names, other, seed):
    """The router's assignment (cumulative weights in version-name order) under the
    controller's steps: weight moves only between stable and candidate, with a third
    version holding a fixed weight, in any name order."""
    from inference.api.router import ModelVersion, Router
    stable, cand, third = names
    r = Router()
    for v in names:
        r.add(ModelVersion("demo", v, "", "", None, None))
    ks = [f"{seed}-{i}" for i in range(300)]
    before = set()
    for step in DEFAULT_STEPS:
        share = (1 - other) * step / 100
        r.set_weights("demo", {stable: max(0.0, 1 - other - share), cand: share, third: other})
        now = {k for k in ks if r.pick("demo", routing_key=k).version == cand}
        assert before <= now
        before = now
