"""Attaching masks: validation, the patched save_pretrained, trainer integration and keep-mask fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from hf_elsa import ElsaTrainer, load_sparse_model, sparsity_report
from hf_elsa.sparse_io import MASKS_NAME, apply_masks, attach_sparsity, detach_sparsity, get_sparsity

from .helpers import assert_bit_identical, blocks, masks_of, pruned_model, state, tiny_args, tiny_model


def test_save_refuses_a_densified_model(tmp_path):
    model = pruned_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(0.5)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*densified.*apply_masks"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    apply_masks(model)
    model.save_pretrained(tmp_path / "m")
    assert sparsity_report(load_sparse_model(tmp_path / "m")).sparsity == pytest.approx(0.9, abs=1e-3)
    detach_sparsity(model)  # an explicit opt-out writes a plain folder
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / MASKS_NAME).exists()
    assert "elsa_sparsity" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_attach_sparsity_validates_masks():
    model = tiny_model()
    with pytest.raises(ValueError, match="names no parameter or module"):
        attach_sparsity(model, {"model.layers.9.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        attach_sparsity(model, {"model.layers.0.mlp.up_proj": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="torch.bool"):
        attach_sparsity(model, {"model.layers.0.mlp.up_proj": torch.ones(64, 32)})
    with pytest.raises(ValueError, match="masks=None"):
        attach_sparsity(model)


def test_save_pretrained_signature_is_the_original_plus_compressed():
    import inspect

    model = pruned_model()
    params = inspect.signature(model.save_pretrained).parameters
    original = inspect.signature(type(model).save_pretrained).parameters
    assert set(original) - {"self"} <= set(params) and params["compressed"].default is False


def test_elsa_trainer_attaches_masks_and_save_model_writes_a_sparse_folder(tmp_path):
    model = tiny_model()
    trainer = ElsaTrainer(model=model, args=tiny_args(tmp_path), train_dataset=blocks())
    with pytest.warns(UserWarning):  # 4 steps do not converge; the warning is expected
        trainer.train()
    st = get_sparsity(model)
    assert st is not None and st.config.method == "elsa" and st.config.sparsity == 0.9
    assert st.config.hyperparameters["admm_interval"] == 1
    opt_masks = {f"{k}.weight": v for k, v in trainer.elsa_optimizer.masks().items()}
    assert all(torch.equal(st.mask(k), opt_masks[k]) for k in opt_masks)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = load_sparse_model(tmp_path / "saved")
    assert_bit_identical(state(model), loaded)
    assert (tmp_path / "saved" / "training_args.bin").exists()


def _keep_mask_args(tmp_path, max_steps, **overrides):
    return tiny_args(
        tmp_path,
        keep_mask=True,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=5,
        **overrides,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keep_mask_fine_tuning_keeps_the_mask_through_accumulation_checkpoint_and_resume(arch, tmp_path):
    pruned_model(arch).save_pretrained(tmp_path / "pruned")
    model = load_sparse_model(tmp_path / "pruned")
    masks, before = masks_of(model), state(model)

    trainer = ElsaTrainer(model=model, args=_keep_mask_args(tmp_path, 15), train_dataset=blocks())
    trainer.train()
    after = state(model)
    assert any(not torch.equal(before[k], after[k]) for k in masks)  # it did train, with lr 1e-2
    for key, mask in masks.items():
        assert torch.equal(after[key] != 0, mask), key  # same zeros, and every kept weight still nonzero
        assert torch.equal(masks_of(model)[key], mask)

    # the checkpoint is itself a sparse folder, and resuming from it keeps the mask
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / MASKS_NAME).exists()
    assert all(torch.equal(masks_of(load_sparse_model(checkpoint))[k], masks[k]) for k in masks)
    resumed_model = load_sparse_model(tmp_path / "pruned")
    resumed = ElsaTrainer(model=resumed_model, args=_keep_mask_args(tmp_path, 15), train_dataset=blocks())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 15
    for key, mask in masks.items():
        assert torch.equal(resumed_model.get_parameter(key) != 0, mask), key
    st = get_sparsity(resumed_model)
    assert st.config.fine_tuning["keep_mask"] and st.config.method == "magnitude"  # the pruning facts survive

    resumed_model.save_pretrained(tmp_path / "final", compressed=True)
    final = load_sparse_model(tmp_path / "final")
    assert all(torch.equal(masks_of(final)[k], masks[k]) for k in masks)
    assert_bit_identical(state(resumed_model), final, canonical_zero=True)


def test_re_pruning_a_loaded_sparse_model_checkpoints_without_stale_masks(tmp_path):
    pruned_model(sparsity=0.5).save_pretrained(tmp_path / "half")
    model = load_sparse_model(tmp_path / "half")
    # ADMM for 5 of 6 steps, so checkpoint-2 is written mid-ADMM: weights move, the 50% masks are stale
    args = tiny_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, admm_interval=1, admm_fraction=0.8)
    trainer = ElsaTrainer(model=model, args=args, train_dataset=blocks())
    with pytest.warns(UserWarning):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2" / MASKS_NAME).exists()
    assert (tmp_path / "run" / "checkpoint-6" / MASKS_NAME).exists()
    assert sparsity_report(model).sparsity == pytest.approx(0.9, abs=1e-3)
    assert get_sparsity(model).config.sparsity == 0.9
