"""Validation tests generated from the settings table (hf_elsa.settings): every field's bounds, choices and type,
so a field added to the table is tested the day it is added (the hand-written lists missed fields)."""

import math

import pytest

from hf_elsa import ElsaConfig
from hf_elsa.settings import DETAILS, ElsaSettings, elsa_fields

FIELDS = {f.name: f for f in elsa_fields()}
BOUNDED = [name for name in FIELDS if DETAILS[name]["bounds"] is not None]
CHOICES = [name for name, f in FIELDS.items() if "choices" in f.metadata]
BOOLS = [name for name, f in FIELDS.items() if f.type in ("bool", bool)]
# fields checked by code of their own (a pattern parser, a list of module names): tested in test_config.py
OWN_CHECKS = {"sparsity_type", "target_modules", "exclude_modules"}
# other settings a choice needs to be valid (the relations between fields)
CONTEXT = {("admm_lambda_schedule", "exponential"): {"admm_lambda_init": 0.1}}


def _integer(name: str) -> bool:
    return "int" in str(FIELDS[name].type)


def _just_outside(name: str) -> list:
    """A value just past each finite bound of the field."""
    low, high, low_inclusive, high_inclusive = DETAILS[name]["bounds"]
    step = 1 if _integer(name) else 1e-6
    values = []
    if low is not None:
        values.append(low - step if low_inclusive else low)
    if high is not None:
        values.append(high + step if high_inclusive else high)
    return values


def _inclusive_edges(name: str) -> list:
    low, high, low_inclusive, high_inclusive = DETAILS[name]["bounds"]
    return [v for v, inclusive in ((low, low_inclusive), (high, high_inclusive)) if v is not None and inclusive]


def test_every_field_is_validated_by_the_table():
    """A field without bounds, choices or a bool type has to be named here (and checked by its own code)."""
    unchecked = set(FIELDS) - set(BOUNDED) - set(CHOICES) - set(BOOLS)
    assert unchecked == OWN_CHECKS
    for name in BOUNDED:
        assert DETAILS[name]["example"] is not None, f"{name}: the table gives no example value for its messages"


@pytest.mark.parametrize(
    "name,value", [(name, value) for name in BOUNDED for value in _just_outside(name)], ids=lambda v: str(v)
)
def test_a_value_past_a_bound_is_refused_naming_the_field_and_an_example(name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"ElsaConfig\.{name}={value!r} must be in .*\(e\.g\. "):
        ElsaConfig(output_dir=str(tmp_path), **{name: value})


@pytest.mark.filterwarnings("ignore:ElsaSettings.*are ignored:UserWarning")  # bounds without allocation: warned
@pytest.mark.parametrize(
    "name,value", [(name, value) for name in BOUNDED for value in _inclusive_edges(name)], ids=lambda v: str(v)
)
def test_an_inclusive_bound_is_accepted(name, value):
    assert getattr(ElsaSettings(**{name: value}), name) == value


@pytest.mark.filterwarnings("ignore:ElsaSettings.*are ignored:UserWarning")  # bounds without allocation: warned
@pytest.mark.parametrize("name", BOUNDED)
def test_the_example_value_is_accepted(name):
    example = DETAILS[name]["example"]
    assert getattr(ElsaSettings(**{name: example}), name) == example


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"ElsaSettings\.{name}=.* must be (a finite number|an integer)"):
        ElsaSettings(**{name: value})


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("value", ["1", True, [1]])
def test_values_of_the_wrong_type_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"ElsaSettings\.{name}=.* must be (a number|an integer)"):
        ElsaSettings(**{name: value})


@pytest.mark.parametrize("name", [name for name in BOUNDED if _integer(name)])
def test_integer_fields_refuse_fractions(name):
    low = DETAILS[name]["bounds"][0] or 0
    with pytest.raises(ValueError, match=rf"ElsaSettings\.{name}=.* must be an integer"):
        ElsaSettings(**{name: low + 1.5})


@pytest.mark.parametrize(
    "name,choice", [(name, choice) for name in CHOICES for choice in FIELDS[name].metadata["choices"]]
)
def test_every_choice_is_accepted(name, choice):
    settings = ElsaSettings(**{name: choice, **CONTEXT.get((name, choice), {})})
    assert getattr(settings, name) == choice


@pytest.mark.parametrize("name", CHOICES)
def test_a_value_not_among_the_choices_is_refused_listing_them(name, tmp_path):
    with pytest.raises(ValueError, match=rf"ElsaConfig\.{name}='no-such-value': use one of \(") as error:
        ElsaConfig(output_dir=str(tmp_path), **{name: "no-such-value"})
    assert all(repr(choice) in str(error.value) for choice in FIELDS[name].metadata["choices"])


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_bool_fields_take_only_true_or_false(name, value):
    with pytest.raises(ValueError, match=rf"ElsaSettings\.{name}="):
        ElsaSettings(**{name: value})


def test_the_checks_hold_after_a_parser_resolved_the_annotations():
    """HfArgumentParser replaces each field's annotation string by the type, in the Field objects ElsaSettings shares
    with ElsaConfig: the table's checks must not depend on which of the two they see."""
    from hf_elsa.scripts import ElsaArgumentParser

    ElsaArgumentParser((ElsaConfig,))
    assert FIELDS["keep_mask"].type is bool  # what the parser did
    with pytest.raises(ValueError, match="must be True or False"):
        ElsaSettings(keep_mask=1)
    with pytest.raises(ValueError, match="must be an integer"):
        ElsaSettings(admm_interval=2.5)


@pytest.mark.parametrize("name", [name for name, f in FIELDS.items() if f.default is not None])
def test_a_field_with_a_default_refuses_none(name):
    with pytest.raises(ValueError, match=rf"ElsaSettings\.{name}=None"):
        ElsaSettings(**{name: None})
