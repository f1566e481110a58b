"""LoRA edges (issue 22): modules_to_save on a masked layer, which adapter the metadata describes, DoRA and LoHa,
prompt tuning, and a dense base with a few stray zeros."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lm_dataset, make_model

import hf_elsa
from hf_elsa import ElsaTrainer
from hf_elsa.oneshot import magnitude
from hf_elsa.sparse_io import attach_sparsity, get_sparsity

peft = pytest.importorskip("peft")

Q = "model.layers.0.self_attn.q_proj.weight"


def _sparse_model(sparsity: float = 0.7):
    model = make_model("llama")
    attach_sparsity(model, magnitude(model, sparsity=sparsity), {"method": "magnitude", "sparsity": sparsity})
    return model


def _peft(config, model=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model if model is not None else _sparse_model(), config, **kwargs)


def _lora(**kwargs):
    return peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["v_proj"], **kwargs}
    )


def _check_masks_kept(merged, masks):
    params = dict(merged.named_parameters())
    for name, keep in masks.items():
        assert torch.equal(params[name] != 0, keep), name


def test_modules_to_save_on_a_masked_layer_merges_and_keeps_the_mask():
    model = _sparse_model()
    masks = {n: get_sparsity(model).mask(n) for n in get_sparsity(model).masks}
    peft_model = _peft(_lora(modules_to_save=["q_proj"]), model)
    with torch.no_grad():  # what training would do to the trainable copy: densify it
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n and n.endswith("q_proj.modules_to_save.default.weight"):
                p.add_(0.01)
    merged = hf_elsa.merge_and_unload(peft_model)
    _check_masks_kept(merged, masks)
    assert get_sparsity(merged).config.fine_tuning["modules_to_save"] == ["q_proj"]


def test_the_trainer_refuses_modules_to_save_on_a_masked_layer_by_name(make_args):
    peft_model = _peft(_lora(modules_to_save=["q_proj"]))
    with pytest.raises(ValueError, match=r"q_proj.*modules_to_save") as info:
        ElsaTrainer(model=peft_model, args=make_args(), train_dataset=lm_dataset(4))
    assert "not a Linear weight" not in str(info.value)


def test_the_metadata_describes_the_merged_adapter():
    peft_model = _peft(_lora(), adapter_name="first")
    peft_model.add_adapter("second", _lora(r=8, lora_alpha=32, target_modules=["q_proj"]))
    merged = hf_elsa.merge_and_unload(peft_model, adapter_names=["second"])
    tuning = get_sparsity(merged).config.fine_tuning
    assert tuning["r"] == 8 and tuning["target_modules"] == ["q_proj"]
    assert tuning["adapter_names"] == ["second"]
    assert tuning["adapter_delta_norm_dropped"] > 0  # measured on q_proj, where "second" is


def test_dora_is_said():
    merged = hf_elsa.merge_and_unload(_peft(_lora(use_dora=True)))
    tuning = get_sparsity(merged).config.fine_tuning
    assert tuning["adapter"] == "dora" and tuning["use_dora"] is True
    assert 0 < tuning["adapter_delta_norm_dropped"] < 1


def test_loha_reports_the_dropped_share():
    model = _sparse_model()
    masks = {n: get_sparsity(model).mask(n) for n in get_sparsity(model).masks}
    merged = hf_elsa.merge_and_unload(_peft(peft.LoHaConfig(r=4, target_modules=["v_proj"], init_weights=False), model))
    tuning = get_sparsity(merged).config.fine_tuning
    assert tuning["adapter"] == "loha" and 0 < tuning["adapter_delta_norm_dropped"] < 1
    _check_masks_kept(merged, masks)


def test_prompt_tuning_is_refused_clearly():
    peft_model = _peft(peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match=r"prompt.*nothing to merge"):
        hf_elsa.merge_and_unload(peft_model)


def _nearly_dense():
    model = make_model("llama")
    with torch.no_grad():
        dict(model.named_parameters())[Q][0, :3] = 0
    return model


def test_a_dense_base_with_a_few_stray_zeros_is_not_a_sparse_model(make_args):
    with pytest.raises(ValueError, match=r"3 exact zeros.*not a pruned model"):
        hf_elsa.merge_and_unload(_peft(_lora(), _nearly_dense()))
    with pytest.raises(ValueError, match=r"3 exact zeros.*not a pruned model"):
        ElsaTrainer(model=_peft(_lora(), _nearly_dense()), args=make_args(), train_dataset=lm_dataset(4))
