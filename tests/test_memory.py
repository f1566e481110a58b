"""estimate_memory against the state tensors a real ElsaTrainer run allocates (tiny models, CPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import elsa_args, lm_dataset, make_model
from transformers import TrainerCallback

from hf_elsa import ElsaTrainer, estimate_memory
from hf_elsa.cli import main
from hf_elsa.memory import measure_state_bytes

# hidden 64: some weights reach bitsandbytes' 8-bit threshold (4096 entries: q/o/MLP), others not (k/v, norms)
TINY = {"hidden": 64, "intermediate": 128}


def _count_state(optimizer) -> dict[str, int]:
    """Bytes of the distinct state tensors, ADMM (elsa_*) keys apart: counted here independently of hf_elsa."""
    seen, out = set(), {"admm": 0, "optimizer": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                out["admm" if key.startswith("elsa_") else "optimizer"] += value.numel() * value.element_size()
    return out


def _state_after(args, steps=2):
    """Optimizer state bytes of an ElsaTrainer run after ``steps`` steps (inside the ADMM phase).

    Runs with the activation-aware projection go through ``Trainer.train`` (its forward hooks collect the
    statistics); the others drive the optimizer the Trainer builds by hand, which is much faster.
    """
    counted = {}
    model = make_model("llama", **TINY)

    def record(optimizer):
        counted.update(_count_state(optimizer))
        counted["measured"] = measure_state_bytes(optimizer)

    class Record(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == steps:
                record(trainer.optimizer)
                control.should_training_stop = True

    trainer = ElsaTrainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[Record()])
    if args.importance == "activation":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer.train()
        return model, counted
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    ids = lm_dataset(4)[:4]["input_ids"]
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    record(trainer.optimizer)
    return model, counted


CASES = {
    "fp32": {},  # adamw_torch_fused, float32 z and u, activation statistics
    "elsa-l": {"elsa_l": True},  # bitsandbytes 8-bit AdamW (embeddings in 32-bit), z fp8, u bf16
    "fp8-magnitude": {"admm_z_dtype": "float8_e5m2", "admm_u_dtype": "float8_e4m3fn", "importance": "magnitude"},
    "adamw-torch-bf16-u": {"optim": "adamw_torch", "admm_u_dtype": "bfloat16", "importance": "magnitude"},
    "sgd": {"optim": "sgd", "importance": "magnitude"},
    "mask-phase": {"admm_fraction": 0.0, "importance": "magnitude"},  # pruned at step 0: boolean masks only
    "fisher": {"importance": "fisher"},  # an fp32 EMA of the squared gradient per prunable weight
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_estimate_equals_allocated_state(case, tmp_path):
    args = elsa_args(tmp_path, max_steps=20, **{"admm_fraction": 0.5, **CASES[case]})
    model, counted = _state_after(args)
    estimate = estimate_memory(model, args)
    assert counted["admm"] == estimate.admm > 0
    assert counted["optimizer"] == estimate.optimizer
    assert counted["measured"] == {"admm": estimate.admm, "optimizer": estimate.optimizer}


def test_bytes_per_prunable_weight():
    model = make_model("llama", **TINY)
    fp32 = estimate_memory(model, elsa_args_free(importance="magnitude"))
    lean = estimate_memory(model, elsa_args_free(elsa_l=True, importance="magnitude"))
    assert fp32.admm_bytes_per_prunable == 8.0 and fp32.admm_detail == {
        "z": 4 * fp32.prunable_parameters,
        "u": 4 * fp32.prunable_parameters,
    }
    assert lean.admm_bytes_per_prunable == 3.0
    assert lean.optimizer < fp32.optimizer / 2
    assert fp32.mask == fp32.prunable_parameters
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert fp32.weights == fp32.gradients == weights
    # the default recipe distils from a frozen copy of the weights
    assert fp32.teacher == weights
    assert fp32.total == fp32.weights + fp32.gradients + fp32.optimizer + fp32.admm + fp32.teacher


def elsa_args_free(**overrides):
    from hf_elsa import ElsaConfig

    return ElsaConfig(output_dir="unused", use_cpu=True, report_to="none", **overrides)


def test_meta_device_model_gives_the_same_estimate():
    import transformers

    model = make_model("llama", **TINY)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(model.config)
    for kwargs in ({}, {"elsa_l": True}):
        args = elsa_args_free(**kwargs)
        assert estimate_memory(meta, args) == estimate_memory(model, args)


def test_frozen_parameters_have_no_gradient_or_optimizer_state():
    model = make_model("llama", **TINY)
    args = elsa_args_free(optim="adamw_torch")
    full = estimate_memory(model, args)
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = estimate_memory(model, args)
    embed = model.model.embed_tokens.weight.numel()
    assert frozen.weights == full.weights
    assert full.gradients - frozen.gradients == 4 * embed
    assert full.optimizer - frozen.optimizer == 8 * embed + 4


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="adafactor"):
        estimate_memory(make_model("llama"), elsa_args_free(optim="adafactor"))


def test_summary_and_dict():
    estimate = estimate_memory(make_model("llama", **TINY), elsa_args_free(elsa_l=True, importance="magnitude"))
    text = estimate.summary()
    assert "optimizer (adamw_bnb_8bit)" in text
    assert "3.00 B per prunable weight (z 1.00, u 2.00)" in text
    data = estimate.to_dict()
    assert data["total"] == estimate.total and data["admm_bytes_per_prunable"] == 3.0
    json.dumps(data)


def test_cli_memory(tmp_path, capsys):
    folder = tmp_path / "tiny"
    model = make_model("llama", **TINY)
    model.save_pretrained(folder)
    assert main(["memory", "--model", str(folder), "--elsa_l", "true", "--importance", "magnitude", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory(model, elsa_args_free(elsa_l=True, importance="magnitude"))
    assert data["admm"] == expected.admm and data["optimizer"] == expected.optimizer
    assert main(["memory", "--model", str(folder)]) == 0
    assert "B per prunable weight (z 4.00, u 4.00" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the choices are in the field's metadata: argparse names them
        main(["memory", "--model", str(folder), "--admm_u_dtype", "fp8"])
    err = capsys.readouterr().err
    assert "--admm_u_dtype" in err and "invalid choice: 'fp8'" in err and "float8_e4m3fn" in err
