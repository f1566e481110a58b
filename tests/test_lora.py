"""LoRA on a sparse model with the real peft package: adapters train, the merge keeps every zero."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_dataset, make_model

import hf_elsa
from hf_elsa import ElsaTrainer, load_sparse_model, sparsity_report
from hf_elsa.oneshot import magnitude
from hf_elsa.sparse_io import attach_sparsity, get_sparsity

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _sparse_model(arch: str, sparsity: float = 0.7):
    model = make_model(arch)
    attach_sparsity(model, magnitude(model, sparsity=sparsity), {"method": "magnitude", "sparsity": sparsity})
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    state = get_sparsity(model)
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in state.masks}


def _lora(arch: str) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                           fan_in_fan_out=arch == "gpt2")  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_round_trip_keeps_every_zero(arch, make_args, tmp_path):
    model = _sparse_model(arch)
    model.save_pretrained(tmp_path / "sparse")
    model = load_sparse_model(tmp_path / "sparse")
    before = _weights(model)
    masks = {name: get_sparsity(model).mask(name) for name in before}

    peft_model = peft.get_peft_model(model, _lora(arch))
    trainer = ElsaTrainer(
        model=peft_model, args=make_args(max_steps=6, learning_rate=1e-2), train_dataset=lm_dataset(16)
    )
    assert trainer.lora is not None and trainer.elsa_optimizer is None
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_" in n)
    trainer.save_model()  # adapters only, as for any PEFT model
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    merged = hf_elsa.merge_and_unload(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    after = dict(merged.named_parameters())
    changed = 0
    for name, keep in masks.items():
        assert torch.equal(after[name] != 0, keep), name  # exactly the same zeros: same mask
        changed += int(not torch.equal(after[name], before[name]))
    assert changed > 0  # the adapters' kept part reached the weights
    meta = get_sparsity(merged).config
    assert meta.method == "magnitude" and meta.fine_tuning["adapter"] == "lora" and meta.fine_tuning["r"] == 4
    dropped = meta.fine_tuning["adapter_delta_norm_dropped"]
    assert 0.5 < dropped < 1.0  # ~sqrt(0.7) of a delta that ignores the mask

    merged.save_pretrained(tmp_path / "merged", compressed=True)  # a sparse checkpoint, not refused
    again = load_sparse_model(tmp_path / "merged")
    assert abs(sparsity_report(again).sparsity - 0.7) < 1e-3
    for name, keep in masks.items():
        assert torch.equal(dict(again.named_parameters())[name] != 0, keep), name


def test_peft_config_argument_and_zeros_without_attached_masks(make_args):
    """peft_config= as in TRL; a base without attached masks keeps the zeros it has."""
    model = make_model("llama")
    magnitude(model, sparsity=0.5)  # zeros, no masks attached
    zeros = {n: (w == 0).clone() for n, w in _named_linear(model).items()}
    trainer = ElsaTrainer(model=model, args=make_args(max_steps=3, learning_rate=1e-2), train_dataset=lm_dataset(8),
                          peft_config=_lora("llama"))  # fmt: skip
    assert isinstance(trainer.model, peft.PeftModel)
    assert abs(trainer.lora.sparsity - 0.5) < 1e-3
    trainer.train()
    merged = hf_elsa.merge_and_unload(trainer.model)
    for name, w in _named_linear(merged).items():
        assert torch.equal(w == 0, zeros[name]), name


def _named_linear(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_dense_base_is_refused_with_a_clear_message(make_args):
    peft_model = peft.get_peft_model(make_model("llama"), _lora("llama"))
    with pytest.raises(ValueError, match="no zeros.*Prune it first"):
        ElsaTrainer(model=peft_model, args=make_args(), train_dataset=lm_dataset(4))


def test_plain_peft_merge_densifies_and_ours_does_not():
    model = _sparse_model("llama")
    peft_model = peft.get_peft_model(model, _lora("llama"))
    dense = peft.get_peft_model(_sparse_model("llama"), _lora("llama")).merge_and_unload()
    with pytest.raises(ValueError, match="nonzero weights where its mask prunes them"):
        dense.save_pretrained("/nonexistent-never-written")
    merged = hf_elsa.merge_and_unload(peft_model)
    assert abs(sparsity_report(merged).sparsity - 0.7) < 1e-3


def test_merge_and_unload_needs_a_peft_model():
    with pytest.raises(TypeError, match="PeftModel"):
        hf_elsa.merge_and_unload(make_model("llama"))
