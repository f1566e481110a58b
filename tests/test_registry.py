"""The one registry shape, and every registered entry held to its kind's contract (parametrized from the registries,
so a new entry is tested the day it is registered)."""

import math

import pytest
import torch
from conftest import make_model

from hf_elsa import load_sparse_model
from hf_elsa.allocation import ALLOCATIONS, SparsityAllocation
from hf_elsa.curvature import ESTIMATORS, CurvatureEstimator, Magnitude, register_estimator
from hf_elsa.inference import KERNELS, Kernel
from hf_elsa.oneshot import PRUNERS, OneShotPruner
from hf_elsa.patterns import PATTERNS, SparsityPattern, sparsity_pattern
from hf_elsa.registry import LiveChoices, Registry, UnknownNameError
from hf_elsa.settings import ElsaSettings
from hf_elsa.sparse_io import attach_sparsity
from hf_elsa.sparse_io.formats import SAVE_FORMATS, SaveFormat, detect_format
from hf_elsa.targets import find_prunable_modules

# -- the Registry type ----------------------------------------------------------------------------------------


def test_a_taken_name_is_refused_naming_the_kind_and_the_fix():
    registry = Registry("importance")
    first = object()
    registry.register("mine", first)
    registry.register("mine", first)  # the same object again (a re-import) is not a conflict
    with pytest.raises(ValueError, match=r"importance='mine' is already registered .*replace=True"):
        registry.register("mine", object())
    second = object()
    assert registry.register("mine", second, replace=True) is second and registry.get("mine") is second


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_name_must_be_a_non_empty_string(name):
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("kernel").register(name, object())


def test_an_unknown_name_lists_the_live_choices():
    registry = Registry("sparsity_allocation")
    registry.register("a", 1)
    with pytest.raises(UnknownNameError, match=r"sparsity_allocation='b': use one of \('a',\)") as error:
        registry.get("b")
    assert isinstance(error.value, ValueError) and isinstance(error.value, KeyError)
    assert str(error.value).startswith("sparsity_allocation=")  # not quoted as a KeyError would be
    registry.register("b", 2)
    assert registry.get("b") == 2 and registry["b"] == 2 and registry.names() == ("a", "b")
    assert registry.get("c", None) is None  # dict.get's default, for pytest's monkeypatch.setitem
    assert registry.unregister("b") == 2 and "b" not in registry and len(registry) == 1


def test_item_assignment_registers_and_deletion_unregisters():
    registry = Registry("format")
    registry["x"] = 1
    with pytest.raises(ValueError, match="already registered"):
        registry["x"] = 2
    del registry["x"]
    assert registry.names() == ()
    copy = Registry("format").copy()
    copy["y"] = 3
    assert "y" in copy


def test_live_choices_follow_the_registry():
    registry = Registry("method")
    choices = LiveChoices(registry, before=("elsa",))
    assert list(choices) == ["elsa"] and "mine" not in choices
    registry.register("mine", object())
    assert list(choices) == ["elsa", "mine"] and "mine" in choices and len(choices) == 2
    assert repr(choices) == "('elsa', 'mine')"


# -- every entry of every registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_every_estimator(name):
    estimator = ESTIMATORS.get(name)
    assert isinstance(estimator, CurvatureEstimator) and estimator.name == name
    assert estimator.curvature("w", {}) is None  # no statistics yet: magnitude ranking
    assert estimator.state_bytes(100, 10) >= 0
    assert ElsaSettings(importance=name).importance == name
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(type(estimator)())


def test_a_registered_estimator_cannot_be_replaced_by_accident():
    with pytest.raises(ValueError, match="importance='magnitude' is already registered"):
        register_estimator(Magnitude())


# One string each registered pattern parses (a new pattern adds its example here: the test below fails until then).
PATTERN_EXAMPLES = {"unstructured": "unstructured", "row": "row", "n:m": "2:4"}


def test_every_pattern_has_an_example():
    assert set(PATTERNS.names()) == set(PATTERN_EXAMPLES)


@pytest.mark.parametrize("name", PATTERNS.names())
def test_every_pattern(name):
    cls = PATTERNS.get(name)
    pattern = sparsity_pattern(PATTERN_EXAMPLES[name])
    assert issubclass(cls, SparsityPattern) and isinstance(pattern, cls)
    assert sparsity_pattern(pattern.name) == pattern  # the name users type parses back to the same pattern
    score = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    keep = pattern.keep_mask(score, 0.5)
    groups = pattern.groups(~keep)
    assert (groups.sum(dim=1) == pattern.zeros(groups.shape[1], 0.5)).all()
    assert ElsaSettings(sparsity_type=pattern.name, sparsity=0.5).pattern == pattern


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_every_allocation_keeps_the_mean_sparsity_within_its_bounds(name):
    cls = ALLOCATIONS.get(name)
    settings = ElsaSettings(sparsity=0.6, sparsity_allocation=name, importance="activation")
    allocation = cls.from_settings(settings)
    assert issubclass(cls, SparsityAllocation) and cls.name == name and isinstance(allocation, cls)
    generator = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.mlp.{p}": (16, 32) for i in range(3) for p in ("up_proj", "down_proj")}
    scores = {n: torch.rand(s, generator=generator) * (1 + i) for i, (n, s) in enumerate(shapes.items())}
    numels = {n: math.prod(s) for n, s in shapes.items()}
    sparsities = allocation.tensor_sparsities(scores, numels, 0.6)
    assert set(sparsities) == set(scores)
    low, high = allocation.bounds(0.6)
    assert all(low - 1e-9 <= s <= high + 1e-9 for s in sparsities.values())
    mean = sum(sparsities[n] * numels[n] for n in numels) / sum(numels.values())
    assert mean == pytest.approx(0.6, abs=1 / sum(numels.values()))


@torch.no_grad()
def _pruned_llama():
    model = make_model("llama").eval()
    masks = {}
    for name, module in find_prunable_modules(model).items():
        keep = sparsity_pattern("unstructured").keep_mask(module.weight.abs(), 0.5)
        module.weight.mul_(keep)
        masks[name] = keep
    attach_sparsity(model, masks, {"method": "magnitude", "sparsity": 0.5})
    return model


@pytest.mark.parametrize("name", SAVE_FORMATS.names())
def test_every_format_round_trips_and_is_detected(name, tmp_path):
    fmt = SAVE_FORMATS.get(name)
    assert isinstance(fmt, SaveFormat) and fmt.name == name and fmt.weight_patterns
    model = _pruned_llama()
    model.save_pretrained(tmp_path, format=name)
    loaded = load_sparse_model(tmp_path, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert detect_format(tmp_path) is fmt


@pytest.mark.parametrize("name", KERNELS.names())
def test_every_kernel_says_where_it_runs(name):
    cls = KERNELS.get(name)
    assert issubclass(cls, Kernel) and cls.name == name
    ok, why = cls.available(torch.float32, torch.device("cpu"))
    assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)  # a kernel that cannot run says why


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_pruner_is_named_and_accepted_by_the_settings(name):
    pruner = PRUNERS.get(name)
    assert isinstance(pruner, OneShotPruner) and pruner.name == name
    assert isinstance(pruner.requires_calibration, bool)
    assert ElsaSettings(admm_init=name).admm_init == name
