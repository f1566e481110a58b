"""ElsaConfig: command-line parsing, recipe presets and validation."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_elsa import ElsaConfig, ElsaSettings

PAPER = {
    "admm_penalty": "gradient",
    "admm_lambda_schedule": "constant",
    "admm_lambda": 0.01,
    "admm_interval": 32,
    "admm_fraction": 1.0,
    "sparsity_schedule": "constant",
    "importance": "magnitude",
}


def _parse(tmp_path, *argv):
    parser = HfArgumentParser(ElsaConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "out"), "--report_to", "none", *argv]
    )
    return config


def test_is_training_arguments(tmp_path):
    assert isinstance(ElsaConfig(output_dir=str(tmp_path)), TrainingArguments)


def test_every_elsa_field_parses_from_the_command_line(tmp_path):
    config = _parse(
        tmp_path,
        "--sparsity",
        "0.8",
        "--sparsity_type",
        "row",
        "--target_modules",
        "q_proj",
        "v_proj",
        "down_proj",
        "--exclude_modules",
        "layers.0.mlp.down_proj",
        "--recipe",
        "paper",
        "--admm_penalty",
        "proximal",
        "--admm_lambda",
        "0.25",
        "--admm_lambda_schedule",
        "cosine",
        "--admm_lambda_init",
        "0.005",
        "--admm_interval",
        "7",
        "--admm_fraction",
        "0.4",
        "--sparsity_schedule",
        "cubic",
        "--importance",
        "adam",
        "--importance_alpha",
        "0.5",
        "--final_projection",
        "false",
        "--keep_mask",
        "true",
        "--max_steps",
        "5",
    )
    assert config.sparsity == pytest.approx(0.8)
    assert config.sparsity_type == "row"
    assert config.target_modules == ["q_proj", "v_proj", "down_proj"]
    assert config.exclude_modules == ["layers.0.mlp.down_proj"]
    assert config.recipe == "paper"
    assert config.admm_penalty == "proximal"
    assert config.admm_lambda == pytest.approx(0.25)
    assert config.admm_lambda_schedule == "cosine"
    assert config.admm_lambda_init == pytest.approx(0.005)
    assert config.admm_interval == 7 and isinstance(config.admm_interval, int)
    assert config.admm_fraction == pytest.approx(0.4)
    assert config.sparsity_schedule == "cubic"
    assert config.importance == "adam"
    assert config.importance_alpha == pytest.approx(0.5)
    assert config.final_projection is False
    assert config.keep_mask is True
    assert config.max_steps == 5


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_parses(tmp_path, pattern):
    assert _parse(tmp_path, "--sparsity_type", pattern).sparsity_type == pattern


def test_defaults(tmp_path):
    config = _parse(tmp_path)
    assert config.sparsity == pytest.approx(0.7)
    assert config.sparsity_type == "unstructured"
    assert config.target_modules is None and config.exclude_modules is None
    assert config.recipe == "elsa" and config.importance == "activation"
    assert config.admm_interval == 0  # automatic: an eighth of the ADMM phase
    assert config.final_projection is True and config.keep_mask is False
    # the recipe filled every recipe-controlled field
    for field in PAPER:
        assert getattr(config, field) is not None, field


def test_training_defaults_follow_the_paper(tmp_path):
    """The paper's recipe: Adam betas (0.9, 0.95), weight decay 0, clip 1.0, linear decay without warmup."""
    config = ElsaConfig(output_dir=str(tmp_path))
    assert (config.adam_beta1, config.adam_beta2) == (0.9, 0.95)
    assert config.adam_epsilon == pytest.approx(1e-8)
    assert config.weight_decay == 0.0
    assert config.max_grad_norm == 1.0
    assert getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type) == "linear"
    assert not config.warmup_steps and not getattr(config, "warmup_ratio", 0)


def test_paper_recipe(tmp_path):
    config = ElsaConfig(output_dir=str(tmp_path), recipe="paper")
    for field, value in PAPER.items():
        assert getattr(config, field) == (pytest.approx(value) if isinstance(value, float) else value), field


def test_paper_recipe_from_command_line(tmp_path):
    config = _parse(tmp_path, "--recipe", "paper")
    for field, value in PAPER.items():
        assert getattr(config, field) == (pytest.approx(value) if isinstance(value, float) else value), field


@pytest.mark.parametrize("recipe", ["paper", "elsa"])
def test_recipe_fills_only_unset_fields(tmp_path, recipe):
    explicit = {
        "admm_penalty": "proximal" if recipe == "paper" else "gradient",
        "admm_lambda": 0.123,
        "admm_interval": 5,
        "admm_fraction": 0.3,
        "sparsity_schedule": "cubic" if recipe == "paper" else "constant",
    }
    config = ElsaConfig(output_dir=str(tmp_path), recipe=recipe, **explicit)
    for field, value in explicit.items():
        assert getattr(config, field) == value, field
    reference = ElsaConfig(output_dir=str(tmp_path), recipe=recipe)
    for field in ("admm_lambda_schedule", "admm_lambda_init"):
        assert getattr(config, field) == getattr(reference, field)


def test_recipes_differ(tmp_path):
    paper = ElsaConfig(output_dir=str(tmp_path), recipe="paper")
    elsa = ElsaConfig(output_dir=str(tmp_path), recipe="elsa")
    assert any(getattr(paper, f) != getattr(elsa, f) for f in PAPER)


def test_elsa_settings_carry_the_fields(tmp_path):
    config = ElsaConfig(
        output_dir=str(tmp_path),
        sparsity=0.6,
        sparsity_type="4:8",
        admm_interval=3,
        admm_lambda=0.2,
        admm_lambda_schedule="linear",
        admm_lambda_init=0.0,
        admm_penalty="gradient",
        admm_fraction=0.5,
        sparsity_schedule="cubic",
        importance="adam",
        importance_alpha=0.5,
        final_projection=False,
        keep_mask=False,
    )
    s = config.elsa_settings()
    assert type(s) is ElsaSettings
    assert (
        s.sparsity,
        s.sparsity_type,
        s.admm_interval,
        s.admm_lambda,
        s.admm_lambda_schedule,
        s.admm_lambda_init,
    ) == (
        0.6,
        "4:8",
        3,
        0.2,
        "linear",
        0.0,
    )
    assert (s.admm_penalty, s.admm_fraction, s.sparsity_schedule, s.importance, s.importance_alpha) == (
        "gradient",
        0.5,
        "cubic",
        "adam",
        0.5,
    )
    assert s.final_projection is False and s.keep_mask is False
    assert s.pattern == config.pattern and s.pattern.name == "4:8"
    # one table of defaults: a bare ElsaSettings is what a bare ElsaConfig resolves to
    assert ElsaSettings().elsa_dict() == ElsaConfig(output_dir=str(tmp_path)).elsa_dict()


def test_single_string_target_becomes_list(tmp_path):
    config = ElsaConfig(output_dir=str(tmp_path), target_modules="q_proj")
    assert config.target_modules == ["q_proj"]


# Single-field bounds and choices are tested from the settings table (test_settings_table.py); here, the checks of
# code of their own and the relations between fields.
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sparsity_type": "2:x"}, "sparsity_type"),
        ({"sparsity_type": "3:2"}, "sparsity_type"),
        ({"sparsity_type": "blocks"}, "sparsity_type"),
        ({"admm_lambda_schedule": "exponential", "admm_lambda_init": 0.0}, "admm_lambda_init"),
        ({"target_modules": [""]}, "target_modules"),
        ({"exclude_modules": [3]}, "exclude_modules"),
        ({"sparsity_allocation": "owl", "importance": "magnitude"}, "importance='activation'"),
        ({"sparsity_allocation": "global", "sparsity_type": "2:4"}, "sparsity_allocation='uniform'"),
        ({"sparsity_allocation": "global", "sparsity": 0.9, "allocation_max_sparsity": 0.8}, "must enclose"),
    ],
)
def test_bad_values_raise_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        ElsaConfig(output_dir=str(tmp_path), **kwargs)


def test_paper_recipe_with_exponential_needs_init(tmp_path):
    # the paper recipe has admm_lambda_init = 0: switching only the schedule to exponential must fail clearly
    with pytest.raises(ValueError, match="admm_lambda_init"):
        ElsaConfig(output_dir=str(tmp_path), recipe="paper", admm_lambda_schedule="exponential")


def test_bad_values_raise_from_command_line(tmp_path):
    with pytest.raises(ValueError, match="sparsity"):
        _parse(tmp_path, "--sparsity", "1.0")
    with pytest.raises(ValueError, match="admm_interval"):
        _parse(tmp_path, "--admm_interval", "-1")


def test_help_metadata_for_every_elsa_field():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(ElsaConfig)}
    for name in (
        "sparsity",
        "sparsity_type",
        "target_modules",
        "exclude_modules",
        "recipe",
        "admm_penalty",
        "admm_lambda",
        "admm_lambda_schedule",
        "admm_lambda_init",
        "admm_interval",
        "admm_fraction",
        "sparsity_schedule",
        "importance",
        "importance_alpha",
        "final_projection",
        "keep_mask",
    ):
        assert fields[name].metadata.get("help"), name


@pytest.mark.parametrize("total, expected", [(150, 3), (40, 1), (4096, 32), (1000, 19)])
def test_automatic_interval(tmp_path, total, expected):
    """admm_interval=0: ceil(ADMM steps / 8), between 1 and 32 (ADMM steps = round(0.15 * total))."""
    import torch

    from hf_elsa.admm import ElsaOptimizer

    config = ElsaConfig(output_dir=str(tmp_path), admm_fraction=0.15)
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = ElsaOptimizer(torch.optim.SGD([p], lr=0.1), {"w": p}, config, total_steps=total)
    assert opt.interval == expected


# ---------------------------------------------------------------------------------------------------
# curvature and flatness fields (docs/curvature.md)
# ---------------------------------------------------------------------------------------------------
def test_curvature_fields_parse_and_reach_the_settings(tmp_path):
    config = _parse(
        tmp_path,
        *("--importance", "hutchinson", "--importance_delta", "0.001", "--importance_beta", "0.9"),
        *("--hessian_interval", "5", "--sam_rho", "0.0002", "--base_optimizer", "sassha"),
    )
    assert (config.importance, config.hessian_interval, config.base_optimizer) == ("hutchinson", 5, "sassha")
    assert config.sam_rho == pytest.approx(2e-4)
    s = config.elsa_settings()
    assert (s.importance_delta, s.importance_beta) == (pytest.approx(1e-3), pytest.approx(0.9))
    defaults = ElsaConfig(output_dir=str(tmp_path))
    assert (defaults.sam_rho, defaults.hessian_interval, defaults.base_optimizer) == (0.0, 10, "trainer")
    for name in ("importance_delta", "importance_beta", "hessian_interval", "sam_rho", "base_optimizer"):
        assert ElsaConfig.__dataclass_fields__[name].metadata.get("help"), name


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"base_optimizer": "sassha", "importance": "adam"}, "importance='adam'"),
        ({"importance": "hutchinson", "torch_compile": True}, "torch_compile"),
        ({"base_optimizer": "sassha", "torch_compile": True}, "torch_compile"),
        (
            {
                "importance": "hutchinson",
                "activation_checkpointing": True,
                "activation_checkpointing_kwargs": {"use_reentrant": True},
            },
            "reentrant",
        ),
        (
            {
                "base_optimizer": "sassha",
                "activation_checkpointing": True,
                "activation_checkpointing_kwargs": {"use_reentrant": True},
            },
            "reentrant",
        ),
    ],
)
def test_bad_curvature_settings_raise_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        ElsaConfig(output_dir=str(tmp_path), **kwargs)


def test_non_reentrant_checkpointing_is_fine_for_hutchinson(tmp_path):
    config = ElsaConfig(output_dir=str(tmp_path), importance="hutchinson", activation_checkpointing=True)
    assert config.activation_checkpointing


def test_docs_field_tables_are_generated_from_the_settings_table():
    import pathlib

    from hf_elsa.settings import settings_markdown

    index = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "index.md").read_text()
    assert settings_markdown() in index, "docs/index.md: paste hf_elsa.settings.settings_markdown() again"


def test_docstring_lists_every_setting_under_its_topic():
    from hf_elsa.settings import elsa_fields

    for f in elsa_fields():
        assert f"        {f.name} (`" in ElsaConfig.__doc__, f.name


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"sparsity": 0.5}, 3e-4),
        ({"sparsity": 0.3}, 3e-4),
        ({"sparsity": 0.7}, 1e-3),
        ({"sparsity": 0.95}, 1e-3),
        ({"sparsity_type": "2:4"}, 1e-3),
        ({"sparsity": 0.6}, (3e-4 * 1e-3) ** 0.5),
        ({"sparsity": 0.9, "recipe": "paper"}, 1e-4),
        ({"sparsity": 0.5, "learning_rate": 2e-3}, 2e-3),  # set explicitly: wins
    ],
)
def test_the_recipe_learning_rate_follows_the_sparsity(kwargs, expected, tmp_path):
    assert ElsaConfig(output_dir=str(tmp_path), **kwargs).learning_rate == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs,expected",
    [({"sparsity": 0.5}, 0.5), ({"sparsity": 0.6}, 0.625), ({"sparsity": 0.9}, 0.75), ({"sparsity_type": "2:4"}, 0.75),
     ({"recipe": "paper"}, 0.0), ({"sparsity": 0.5, "distill_weight": 1.0}, 1.0)],
)  # fmt: skip
def test_the_recipe_distillation_weight_follows_the_sparsity(kwargs, expected, tmp_path):
    assert ElsaConfig(output_dir=str(tmp_path), **kwargs).distill_weight == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs,start,fraction",
    [
        ({"sparsity": 0.9}, 0.8, 0.3),
        ({"sparsity": 0.8}, 0.7, 0.3),
        ({"sparsity": 0.7}, None, 0.15),
        ({"sparsity_type": "2:4"}, None, 0.15),
        ({"sparsity": 0.9, "admm_fraction": 0.0}, None, 0.0),
        ({"sparsity": 0.9, "recipe": "oneshot_kd"}, None, 0.0),
        ({"sparsity": 0.9, "recipe": "paper"}, None, 1.0),
        ({"sparsity": 0.5, "admm_init_sparsity": 0.3}, 0.3, 0.3),
    ],
)
def test_the_default_recipe_starts_denser_from_80_percent(kwargs, start, fraction, tmp_path):
    """recipe="elsa": from 80% up (patterns that ramp) the start is 10 points denser and the ADMM phase 30% of the steps."""
    config = ElsaConfig(output_dir=str(tmp_path), **kwargs)
    assert config.admm_init_sparsity == (None if start is None else pytest.approx(start))
    assert config.admm_fraction == pytest.approx(fraction)
    config.sparsity = 0.5  # derived values follow a changed sparsity (unless set explicitly)
    config.validate()
    if "admm_init_sparsity" not in kwargs and "recipe" not in kwargs and "admm_fraction" not in kwargs:
        assert config.admm_init_sparsity is None and config.admm_fraction == pytest.approx(0.15)


@pytest.mark.parametrize(
    "sparsity_type,start,expected,final",
    [("unstructured", 0.9, 0.0, 0.9), ("unstructured", 0.8, 0.8, 0.9), ("2:4", None, 0.5, 0.5), ("2:4", 0.3, 0.3, 0.5)],
)
def test_the_ramp_starts_from_a_denser_start_only(sparsity_type, start, expected, final, tmp_path):
    """admm_init_sparsity equal to the target is the start at the target: z's cubic ramp from 0, as with None.
    N:M has no ramp from 0 (one fixed ratio) but ramps from a denser start."""
    import torch

    from hf_elsa.admm import ElsaOptimizer

    config = ElsaConfig(
        output_dir=str(tmp_path), sparsity=0.9, sparsity_type=sparsity_type, admm_init_sparsity=start, admm_fraction=0.3
    )
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = ElsaOptimizer(torch.optim.SGD([p], lr=0.1), {"w": p}, config, total_steps=100)
    assert opt.sparsity_at(0) == pytest.approx(expected)
    assert opt.sparsity_at(opt.ramp_steps) == pytest.approx(final)
