"""Config corners (issue 22): allocation bounds under the uniform allocation, fields changed after construction
(checked again by ``validate()``, which ElsaTrainer calls), and non-finite weights found before training."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_model

from hf_elsa.config import ElsaConfig
from hf_elsa.settings import ElsaSettings
from hf_elsa.sparse_io import check_finite_weights


def _args(tmp_path, **kwargs) -> ElsaConfig:
    return ElsaConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


# -- allocation bounds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_floor_above_the_cap_is_refused(allocation):
    with pytest.raises(ValueError, match=r"allocation_min_sparsity=0\.8.*allocation_max_sparsity=0\.6"):
        ElsaSettings(sparsity=0.7, sparsity_allocation=allocation, allocation_min_sparsity=0.8,
                     allocation_max_sparsity=0.6)  # fmt: skip


@pytest.mark.parametrize("bounds", [{"allocation_min_sparsity": 0.3}, {"allocation_max_sparsity": 0.9}])
def test_bounds_under_the_uniform_allocation_are_said_to_be_ignored(bounds):
    with pytest.warns(UserWarning, match=r"ignored.*uniform"):
        ElsaSettings(sparsity=0.7, **bounds)


def test_no_warning_without_bounds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ElsaSettings(sparsity=0.7)
        ElsaSettings(sparsity=0.7, sparsity_allocation="global", allocation_min_sparsity=0.3)


# -- fields changed after construction ---------------------------------------------------------------------------


def test_validate_follows_a_changed_sparsity_with_the_derived_cap(tmp_path):
    args = _args(tmp_path, sparsity=0.5, sparsity_allocation="global")
    assert args.allocation_max_sparsity == pytest.approx(1 - 0.5 / 3)
    args.sparsity = 0.9
    args.validate()
    assert args.allocation_max_sparsity == pytest.approx(1 - 0.1 / 3)


def test_validate_keeps_a_cap_set_by_the_user(tmp_path):
    args = _args(tmp_path, sparsity=0.5, sparsity_allocation="global", allocation_max_sparsity=0.95)
    args.sparsity = 0.9
    args.validate()
    assert args.allocation_max_sparsity == 0.95


def test_validate_follows_the_recipe_learning_rate_unless_set(tmp_path):
    args = _args(tmp_path, sparsity=0.5)
    derived = args.learning_rate
    args.sparsity = 0.9
    args.validate()
    assert args.learning_rate != derived  # the recipe's rate for 0.9
    args.learning_rate = 5e-4
    args.sparsity = 0.5
    args.validate()
    assert args.learning_rate == 5e-4


@pytest.mark.parametrize(
    "field, value", [("admm_lambda", math.nan), ("sparsity", 1.5), ("sparsity_allocation", "everywhere")]
)
def test_validate_refuses_a_bad_value_set_after_construction(tmp_path, field, value):
    args = _args(tmp_path)
    setattr(args, field, value)
    with pytest.raises(ValueError, match=field):
        args.validate()


def test_validate_is_what_construction_checks(tmp_path):
    args = _args(tmp_path, sparsity=0.6)
    args.validate()  # a valid config stays valid, unchanged
    assert args.sparsity == 0.6


# -- non-finite weights before training --------------------------------------------------------------------------


def test_check_finite_weights_names_a_non_prunable_tensor():
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*1 inf.*before training"):
        check_finite_weights(model, "ElsaTrainer")


def test_check_finite_weights_passes_a_finite_model():
    check_finite_weights(make_model("llama"), "ElsaTrainer")


def test_bounds_that_cannot_hold_the_exact_budget_are_said():
    """Bounds that pin every tensor (floor == cap) cannot absorb the rounding: the shortfall is warned, not silent."""
    from hf_elsa.allocation.base import bounded_counts

    numels = {"a": 10, "b": 10, "c": 10}
    wanted = dict.fromkeys(numels, 0.75)
    with pytest.warns(UserWarning, match=r"cannot hold exactly 23 zeros.*21"):
        counts = bounded_counts(wanted, numels, total=23, low=0.75, high=0.75)
    assert sum(counts.values()) == 21  # the closest feasible counts, as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(bounded_counts(wanted, numels, total=23, low=0.5, high=0.9).values()) == 23
