"""Whole runs of ElsaTrainer that must end exactly sparse: allocations, warm starts x recipes, resumes that
change settings (honoured or refused, never silently wrong)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from conftest import StopAt, elsa_args, lm_dataset, make_model, prunable_weights, train_quietly
from transformers import TrainerCallback

from hf_elsa import ElsaConfig, ElsaTrainer


def _zeros(model):
    return {n: int((w == 0).sum()) for n, w in prunable_weights(model).items()}


# ---------------------------------------------------------------------------------------------------
# non-uniform allocation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["global", "owl"])
@pytest.mark.parametrize("recipe", ["elsa", "paper"])
def test_allocation_ends_with_the_exact_total_within_bounds(allocation, recipe, tmp_path):
    model = make_model("llama")
    extra = {"importance": "activation"} if allocation == "owl" else {}
    args = elsa_args(
        tmp_path,
        sparsity=0.7,
        sparsity_allocation=allocation,
        allocation_min_sparsity=0.6,
        allocation_max_sparsity=0.8,
        recipe=recipe,
        max_steps=12,
        **extra,
    )
    trainer = train_quietly(model, args)
    zeros, numels = _zeros(model), {n: w.numel() for n, w in prunable_weights(model).items()}
    assert sum(zeros.values()) == round(0.7 * sum(numels.values()))
    assert all(0.6 - 1e-9 <= zeros[n] / numels[n] <= 0.8 + 1e-9 for n in zeros)
    assert len({zeros[n] / numels[n] for n in zeros}) > 1, "the allocation should differ from uniform here"
    # the masks the optimizer keeps are the zeros
    for name, mask in trainer.elsa_optimizer.masks().items():
        assert int((~mask).sum()) == zeros[name]


def test_allocation_is_refused_for_nm(tmp_path):
    with pytest.raises(ValueError, match="sparsity_allocation='global'.*uniform"):
        elsa_args(tmp_path, sparsity_type="2:4", sparsity_allocation="global")


def test_owl_needs_activation_statistics(tmp_path):
    with pytest.raises(ValueError, match="owl.*importance='activation'"):
        elsa_args(tmp_path, sparsity_allocation="owl", recipe="paper")


def test_owl_allocation_survives_resume(tmp_path):
    common = dict(sparsity=0.7, sparsity_allocation="owl", max_steps=12, learning_rate=3e-3)
    straight = make_model("llama")
    train_quietly(straight, elsa_args(tmp_path / "a", **common))
    interrupted = make_model("llama")
    train_quietly(
        interrupted, elsa_args(tmp_path / "b", save_strategy="steps", save_steps=4, **common), callbacks=[StopAt(4)]
    )
    resumed = make_model("llama", seed=1)  # the student from the checkpoint, the teacher given (never checkpointed)
    train_quietly(
        resumed,
        elsa_args(tmp_path / "c", **common),
        resume=str(tmp_path / "b" / "out" / "checkpoint-4"),
        teacher_model=make_model("llama"),
    )
    for name, w in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], w, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------
# warm starts compose with every recipe
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("recipe,extra", [("elsa", {}), ("paper", {}), ("elsa", {"admm_fraction": 0.0})])
def test_every_admm_init_with_every_recipe_ends_exactly_sparse(init, recipe, extra, tmp_path):
    model = make_model("llama")
    args = elsa_args(tmp_path, sparsity=0.6, admm_init=init, admm_init_samples=8, recipe=recipe, max_steps=8, **extra)
    trainer = train_quietly(model, args)
    for name, w in prunable_weights(model).items():
        # wanda compares per output row: its mask has round(in * s) zeros per row; ADMM re-projects per tensor
        expected = round(0.6 * w.shape[1]) * w.shape[0] if init == "wanda" and extra else round(0.6 * w.numel())
        assert int((w == 0).sum()) == expected, name
    assert trainer.elsa_optimizer.masks()


def test_warm_start_starts_from_the_one_shot_weights(tmp_path):
    """The first z is the one-shot pruned weights (SparseGPT also updates the kept ones)."""
    from hf_elsa.oneshot import sparsegpt

    dataset = lm_dataset(48)
    reference = make_model("llama")
    calibration = torch.as_tensor(dataset[:8]["input_ids"])
    sparsegpt(reference, calibration, sparsity=0.6, progress=False)
    model = make_model("llama")
    trainer = ElsaTrainer(
        model=model,
        args=elsa_args(tmp_path, sparsity=0.6, admm_init="sparsegpt", admm_init_samples=8, max_steps=8),
        train_dataset=dataset,
    )
    trainer.create_optimizer_and_scheduler(8)
    trainer._warm_start()
    trainer.elsa_optimizer.initialize()
    for name, w in prunable_weights(reference).items():
        z, _ = trainer.elsa_optimizer.z_and_u(name)
        torch.testing.assert_close(z, w, rtol=0, atol=1e-6, msg=name)


def test_admm_init_without_training_blocks_fails_at_construction(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="'input_ids'"):
        ElsaTrainer(
            model=make_model("llama"),
            args=elsa_args(tmp_path, admm_init="wanda"),
            train_dataset=Dataset.from_dict({"token_ids": [[1, 2, 3]]}),
        )


def test_the_default_recipe_starts_from_sparsegpt_and_distils(tmp_path):
    from hf_elsa import ElsaConfig

    args = ElsaConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, admm_init_samples=8, sparsity=0.6,
    )  # fmt: skip
    assert args.admm_init == "sparsegpt" and args.distill_weight == pytest.approx(0.625)  # 60%: halfway
    assert args.learning_rate == pytest.approx(3e-4 * (1e-3 / 3e-4) ** 0.5)  # 60%: halfway, log-linear
    model = make_model("llama")
    trainer = train_quietly(model, args)
    assert trainer.teacher_model is not None
    assert any("loss_distill" in h for h in trainer.state.log_history)
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name


# ---------------------------------------------------------------------------------------------------
# resume with other settings: honoured where well defined, refused otherwise
# ---------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, step, total, **common):
    model = make_model("llama")
    args = elsa_args(tmp_path / "first", save_strategy="steps", save_steps=step, max_steps=total, **common)
    train_quietly(model, args, callbacks=[StopAt(step)])
    return str(tmp_path / "first" / "out" / f"checkpoint-{step}")


def test_resume_with_a_shorter_run_keeps_the_checkpoints_phase_and_ends_exactly_sparse(tmp_path):
    # 40 steps at admm_fraction 0.25: the mask is fixed at step 10; resumed at 4 with max_steps=20 the new
    # fraction would put it at step 5 -- the checkpoint's own boundary (10) is kept.
    ckpt = _checkpoint(tmp_path, 4, 40, sparsity=0.5, admm_fraction=0.25)
    model = make_model("llama", seed=1)
    trainer = train_quietly(
        model,
        elsa_args(tmp_path / "r", sparsity=0.5, admm_fraction=0.25, max_steps=20),
        resume=ckpt,
        teacher_model=make_model("llama"),
    )
    assert trainer.elsa_optimizer.admm_steps == 10
    assert all(z == round(0.5 * w.numel()) for z, w in zip(_zeros(model).values(), prunable_weights(model).values()))


def test_resume_with_a_run_too_short_for_the_checkpoints_phase_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, 4, 40, sparsity=0.5, admm_fraction=0.5)  # mask fixed at step 20
    model = make_model("llama", seed=1)
    with pytest.raises(ValueError, match="fixes the mask at step 20.*max_steps >= 20"):
        train_quietly(model, elsa_args(tmp_path / "r", sparsity=0.5, admm_fraction=0.5, max_steps=12), resume=ckpt)


def test_resume_of_a_fixed_mask_checkpoint_with_a_longer_run(tmp_path):
    ckpt = _checkpoint(tmp_path, 6, 12, sparsity=0.5, admm_fraction=0.25)  # mask fixed at step 3
    model = make_model("llama", seed=1)
    train_quietly(
        model,
        elsa_args(tmp_path / "r", sparsity=0.5, admm_fraction=0.25, max_steps=30),
        resume=ckpt,
        teacher_model=make_model("llama"),
    )
    assert all(z == round(0.5 * w.numel()) for z, w in zip(_zeros(model).values(), prunable_weights(model).values()))


@pytest.mark.parametrize(
    "change,match", [({"sparsity": 0.9}, "sparsity=0.5"), ({"sparsity_type": "2:4"}, "'unstructured'")]
)
def test_resume_with_other_sparsity_settings_is_refused(change, match, tmp_path):
    ckpt = _checkpoint(tmp_path, 6, 12, sparsity=0.5, admm_fraction=0.25)
    settings = {"sparsity": 0.5, "admm_fraction": 0.25, "max_steps": 12, **change}
    with pytest.raises(ValueError, match=match):
        train_quietly(make_model("llama", seed=1), elsa_args(tmp_path / "r", **settings), resume=ckpt)


def test_resume_without_optimizer_state_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, 4, 12, sparsity=0.5)
    os.remove(os.path.join(ckpt, "optimizer.pt"))
    with pytest.raises(ValueError, match="no optimizer state.*Start a new run"):
        train_quietly(make_model("llama", seed=1), elsa_args(tmp_path / "r", sparsity=0.5, max_steps=12), resume=ckpt)


# ---------------------------------------------------------------------------------------------------
# settings: every float field refuses NaN and infinities
# ---------------------------------------------------------------------------------------------------
FLOAT_FIELDS = [
    "sparsity",
    "admm_lambda",
    "admm_lambda_init",
    "admm_fraction",
    "importance_alpha",
    "importance_delta",
    "importance_beta",
    "sam_rho",
    "allocation_min_sparsity",
    "allocation_max_sparsity",
    "owl_spread",
    "owl_outlier_threshold",
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5", True])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_float_settings_refuse_non_finite_and_wrong_types(name, value, tmp_path):
    with pytest.raises(ValueError, match=f"ElsaConfig.{name}="):
        ElsaConfig(output_dir=str(tmp_path), **{name: value})


@pytest.mark.parametrize("name", ["admm_interval", "hessian_interval", "admm_init_samples"])
@pytest.mark.parametrize("value", [1.5, math.nan, -1, True])
def test_integer_settings_refuse_non_integers(name, value, tmp_path):
    with pytest.raises(ValueError, match=f"ElsaConfig.{name}="):
        ElsaConfig(output_dir=str(tmp_path), **{name: value})


def test_nm_with_zero_kept_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1 <= N < M"):
        ElsaConfig(output_dir=str(tmp_path), sparsity_type="0:4")


# ---------------------------------------------------------------------------------------------------
# non-finite weights stop the run with the tensors named
# ---------------------------------------------------------------------------------------------------
def test_a_model_that_comes_with_nan_is_refused_before_training(tmp_path):
    model = make_model("llama")
    name, weight = next(iter(prunable_weights(model).items()))
    with torch.no_grad():
        weight[0, 0] = float("nan")
    # named before the SparseGPT warm start, which would otherwise blame a singular calibration Hessian
    with pytest.raises(
        ValueError, match=f"the model: 1 tensor holds NaN/inf values: '{name}.weight' \\(1 NaN\\) before training"
    ):
        train_quietly(model, elsa_args(tmp_path, max_steps=4))


def test_a_diverged_run_stops_at_the_mask_fix_naming_the_tensors(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(iter(prunable_weights(model).values()))[1, 1] = float("inf")

    with pytest.raises(FloatingPointError, match="when the mask is fixed.*lower learning_rate"):
        train_quietly(make_model("llama"), elsa_args(tmp_path, max_steps=12, admm_fraction=0.5), callbacks=[Poison()])


def test_evaluate_results_reach_the_saved_metadata_and_card(tmp_path):
    import json

    model = make_model("llama")
    args = elsa_args(tmp_path, sparsity=0.5, max_steps=6)
    trainer = train_quietly(model, args, eval_dataset=lm_dataset(8, seed=3))
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    meta = json.loads((tmp_path / "saved" / "elsa_config.json").read_text())
    assert meta["evaluation"]["results"]["perplexity"] == pytest.approx(metrics["eval_perplexity"])
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "model-index" in card and f"{metrics['eval_perplexity']:.2f}"[:4] in card


@pytest.mark.parametrize("recipe,fraction,warns", [("paper", 1.0, True), ("elsa", 0.0, False)])
def test_the_unconverged_warning_is_about_admm(recipe, fraction, warns, tmp_path):
    """The paper's recipe in 8 steps has not converged when the mask is fixed; masked fine-tuning (no ADMM
    phase) prunes by projection at step 0 by design and must not be told to raise admm_lambda."""
    # the magnitude start, so that masked fine-tuning's step-0 projection removes much (SparseGPT's removes nothing:
    # it pruned the weights itself)
    args = elsa_args(tmp_path, recipe=recipe, admm_fraction=fraction, max_steps=8, sparsity=0.9, admm_init="magnitude")
    trainer = ElsaTrainer(model=make_model("llama"), args=args, train_dataset=lm_dataset(48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.elsa_optimizer.final_removed > 0.1  # both projections remove much: only one is ADMM's fault
    assert any("had not converged" in str(w.message) for w in caught) == warns


def test_oneshot_kd_keeps_the_one_shot_mask_and_the_default_searches(tmp_path, monkeypatch):
    """recipe="oneshot_kd" is the default without the mask search; both log how far the mask moved from the start."""
    import hf_elsa.oneshot

    start_masks = {}
    pruner = type(hf_elsa.oneshot.PRUNERS.get("sparsegpt"))
    original = pruner.__call__

    def recording(self, model, *args, **kwargs):
        masks = original(self, model, *args, **kwargs)
        start_masks.update({name: mask.clone() for name, mask in masks.items()})
        return masks

    monkeypatch.setattr(pruner, "__call__", recording)
    frozen = train_quietly(make_model("llama"), elsa_args(tmp_path / "k", recipe="oneshot_kd", max_steps=8))
    assert frozen.args.admm_fraction == 0 and frozen.teacher_model is not None
    assert all(torch.equal(frozen.elsa_optimizer.masks()[n], m) for n, m in start_masks.items())
    moved = [h["elsa/mask_moved_from_start"] for h in frozen.state.log_history if "elsa/mask_moved_from_start" in h]
    assert moved and moved[-1] == 0.0
    searched = train_quietly(make_model("llama"), elsa_args(tmp_path / "e", max_steps=12, admm_fraction=0.5))
    changed = sum(int((searched.elsa_optimizer.masks()[n] != m).sum()) for n, m in start_masks.items())
    total = sum(m.numel() for m in start_masks.values())
    logged = [h["elsa/mask_moved_from_start"] for h in searched.state.log_history if "elsa/mask_moved_from_start" in h]
    assert logged[-1] == pytest.approx(changed / total)


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_a_denser_start_is_pruned_to_the_target_by_the_ramp(sparsity_type, tmp_path, monkeypatch):
    """admm_init_sparsity: the warm start prunes to it (unstructured under N:M), z's ramp takes the rest (under N:M
    through masks that contain an N:M mask); the run ends exactly at the target, and the mask moved from the start by at
    least the extra sparsity."""
    import hf_elsa.oneshot

    calls = []
    pruner = type(hf_elsa.oneshot.PRUNERS.get("sparsegpt"))
    original = pruner.__call__

    def recording(self, model, *args, **kwargs):
        calls.append((kwargs["sparsity"], str(getattr(kwargs["sparsity_type"], "name", kwargs["sparsity_type"]))))
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(pruner, "__call__", recording)
    model = make_model("llama")
    args = elsa_args(tmp_path, sparsity=0.75, sparsity_type=sparsity_type, admm_init_sparsity=0.25, admm_fraction=0.5)
    trainer = train_quietly(model, args)
    assert calls == [(0.25, "unstructured")]
    opt = trainer.elsa_optimizer
    final = 0.75 if sparsity_type == "unstructured" else 0.5  # N:M ramps too, to its own ratio (ramp_mask)
    assert opt.sparsity_at(0) == pytest.approx(0.25) and opt.sparsity_at(opt.ramp_steps) == pytest.approx(final)
    ramped = [h["elsa/z_sparsity"] for h in trainer.state.log_history if "elsa/z_sparsity" in h]
    assert ramped[0] < final and ramped == sorted(ramped)
    for name, w in prunable_weights(model).items():
        if sparsity_type == "2:4":
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2, name
        assert int((w == 0).sum()) == round((0.75 if sparsity_type == "unstructured" else 0.5) * w.numel()), name
    moved = [h["elsa/mask_moved_from_start"] for h in trainer.state.log_history if "elsa/mask_moved_from_start" in h]
    assert moved[-1] >= (0.75 if sparsity_type == "unstructured" else 0.5) - 0.25 - 1e-6


@pytest.mark.parametrize("extra,match", [({"admm_fraction": 0.0}, "no ADMM phase"), ({"sparsity": 0.5}, "above")])
def test_a_denser_start_needs_an_admm_phase_and_a_denser_value(extra, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        elsa_args(tmp_path, admm_init_sparsity=0.6, **{"sparsity": 0.8, **extra})
