"""Extending hf_elsa from outside the package: an estimator, an allocation and a one-shot pruner defined here, each
registered with one call, then used by name through ElsaConfig, ElsaTrainer and the hf-elsa command."""

import json

import pytest
import torch
from conftest import elsa_args, lm_dataset, make_char_tokenizer, make_model, train_quietly

from hf_elsa import ElsaConfig, load_sparse_model, sparsity_report
from hf_elsa.allocation import ALLOCATIONS, SparsityAllocation, register_allocation
from hf_elsa.cli import main
from hf_elsa.curvature import ESTIMATORS, CurvatureEstimator, register_estimator
from hf_elsa.oneshot import PRUNERS, OneShotPruner, register_pruner
from hf_elsa.scripts import ElsaArgumentParser


class CountingEstimator(CurvatureEstimator):
    """No curvature (magnitude ranking), but counts how often the projection asks for it."""

    name = "test_counting"

    def __init__(self):
        self.calls = 0

    def curvature(self, name, state):
        self.calls += 1


class CountingUniform(SparsityAllocation):
    """Every tensor at the mean sparsity, counting its calls."""

    name = "test_uniform"
    calls = 0

    def tensor_sparsities(self, scores, numels, sparsity, reduce=None):
        type(self).calls += 1
        return {name: sparsity for name in scores}


class LargestHalfPruner(OneShotPruner):
    """Magnitude pruning written as a user would: no calibration, one module at a time."""

    name = "test_largest"
    requires_calibration = False

    def __init__(self):
        self.pruned = []

    @torch.no_grad()
    def prune_module(self, name, module, pattern, sparsity, statistic):
        self.pruned.append(name)
        keep = pattern.keep_mask(module.weight.abs(), sparsity)
        module.weight.mul_(keep)
        return keep


@pytest.fixture
def plugins():
    """The three registered for one test, then removed (the registries are process-wide)."""
    estimator, pruner = CountingEstimator(), LargestHalfPruner()
    register_estimator(estimator)
    register_allocation(CountingUniform)
    register_pruner(pruner)
    CountingUniform.calls = 0
    try:
        yield estimator, pruner
    finally:
        ESTIMATORS.unregister(estimator.name)
        ALLOCATIONS.unregister(CountingUniform.name)
        PRUNERS.unregister(pruner.name)


NAMES = {"importance": "test_counting", "sparsity_allocation": "test_uniform", "admm_init": "test_largest"}


def test_config_accepts_names_registered_after_import_and_refuses_them_once_removed(plugins, tmp_path):
    config = ElsaConfig(output_dir=str(tmp_path), **NAMES)
    assert (config.importance, config.sparsity_allocation, config.admm_init) == tuple(NAMES.values())
    ESTIMATORS.unregister("test_counting")
    try:
        with pytest.raises(ValueError, match=r"ElsaConfig.importance='test_counting': use one of \("):
            ElsaConfig(output_dir=str(tmp_path), importance="test_counting")
    finally:
        register_estimator(plugins[0])


def test_help_lists_the_registered_names(plugins):
    text = ElsaArgumentParser((ElsaConfig,)).format_help()
    for name in NAMES.values():
        assert name in text, name


def test_the_trainer_uses_them_by_name(plugins, tmp_path):
    estimator, pruner = plugins
    model = make_model("llama")
    args = elsa_args(tmp_path, sparsity=0.5, max_steps=4, admm_init_samples=4, **NAMES)
    trainer = train_quietly(model, args, lm_dataset(16))
    assert pruner.pruned and estimator.calls > 0 and CountingUniform.calls > 0
    assert sparsity_report(trainer.model).sparsity == pytest.approx(0.5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return str(folder)


def _files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 40)
        paths.append(str(path))
    return paths


COMMON = ["--block_size", "16", "--eval_seqlen", "16", "--eval_windows", "1", "--use_cpu", "--disable_tqdm", "true"]


def test_the_command_line_prunes_with_a_registered_pruner(plugins, base, tmp_path, capsys):
    out = tmp_path / "oneshot"
    assert main(["prune", "--model_name_or_path", base, "--text_files", *_files(tmp_path), *COMMON,
                 "--method", "test_largest", "--sparsity", "0.5", "--output_dir", str(out)]) == 0  # fmt: skip
    assert plugins[1].pruned
    assert json.loads((out / "elsa_config.json").read_text())["method"] == "test_largest"
    assert sparsity_report(load_sparse_model(out)).sparsity == pytest.approx(0.5)


def test_the_command_line_trains_with_registered_names(plugins, base, tmp_path, capsys):
    estimator, pruner = plugins
    out = tmp_path / "elsa"
    assert main(["prune", "--model_name_or_path", base, "--text_files", *_files(tmp_path), *COMMON,
                 "--importance", "test_counting", "--sparsity_allocation", "test_uniform", "--admm_init",
                 "test_largest", "--admm_init_samples", "4", "--sparsity", "0.5", "--max_steps", "4", "--admm_fraction", "1",
                 "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                 "--output_dir", str(out)]) == 0  # fmt: skip
    assert pruner.pruned and estimator.calls > 0 and CountingUniform.calls > 0
    saved = json.loads((out / "elsa_config.json").read_text())["hyperparameters"]
    assert {key: saved[key] for key in NAMES} == NAMES


def test_the_command_line_refuses_an_unregistered_method(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--model_name_or_path", base, "--method", "test_largest", "--output_dir", str(tmp_path)])
    assert "invalid choice: 'test_largest'" in capsys.readouterr().err
