"""The one conditions parser: typed values, unknown keys and conflicting values named, used by the CLI path."""

from __future__ import annotations

import pytest

from ehrsynth.errors import ConfigError
from ehrsynth.models.conditions import Conditions, parse_pairs
from ehrsynth.pipeline import parse_conditions


def test_pairs_and_typed_values():
    pairs = parse_pairs(["label:mortality=1", " sex = f ", "age=67", "sex=f"])
    assert pairs == {"label:mortality": "1", "sex": "f", "age": "67"}
    parsed = Conditions.parse(pairs, labels=("mortality",), sex=True, age=True)
    assert parsed == Conditions({"mortality": 1}, 0, 67.0) and parsed
    assert not Conditions.parse(None, labels=("mortality",))
    assert Conditions.parse({"mortality": "false"}, labels=("mortality",)).labels == {"mortality": 0}


@pytest.mark.parametrize("pairs, match", [
    (["sex=F", "sex=M"], "--condition gives 'sex' two values: 'F' and 'M'"),
    (["novalue"], "--condition expects KEY=VALUE"),
])
def test_conflicting_pairs_name_the_flag(pairs, match):
    with pytest.raises(ConfigError, match=match):
        parse_conditions(pairs)


@pytest.mark.parametrize("conditions, match", [
    ({"mortality": "1", "label:mortality": "0"}, "--condition gives label 'mortality' two values: 1 and 0"),
    ({"label:nope": "1"}, r"unknown condition 'label:nope'; this model conditions on \['label:mortality', 'sex'\]"),
    ({"age": "50"}, "unknown condition 'age'"),
    ({"sex": "X"}, "condition 'sex' must be one of"),
    ({"mortality": "2"}, "'0' or '1', got '2'"),
])
def test_bad_conditions_are_named(conditions, match):
    with pytest.raises(ConfigError, match=match):
        Conditions.parse(conditions, labels=("mortality",), sex=True)


def test_age_must_be_a_finite_number():
    for bad in ("old", "inf"):
        with pytest.raises(ConfigError, match="condition 'age'"):
            Conditions.parse({"age": bad}, age=True)
