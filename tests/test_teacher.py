"""The default recipe where users combine it: the teacher rule, its checks, resume, LoRA, the warm start, best model.

Each test here failed before the teacher and the warm start got their own rules (one process; the same under DDP and
FSDP2 is ``tests/distributed/test_matrix.py``).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import StopAt, elsa_args, lm_dataset, make_char_tokenizer, make_model, prunable_weights, train_quietly

from hf_elsa import ElsaTrainer, estimate_memory
from hf_elsa.teacher import fingerprint, same_fingerprint

peft = pytest.importorskip("peft")


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def _pruned(seed: int = 0):
    from hf_elsa import attach_sparsity
    from hf_elsa.oneshot import magnitude

    model = make_model("llama", seed=seed)
    masks = magnitude(model, sparsity=0.6)
    attach_sparsity(model, {f"{n}.weight": m for n, m in masks.items()})
    return model


def _distilled(trainer) -> list[float]:
    return [h["loss_distill"] for h in trainer.state.log_history if "loss_distill" in h]


# -- the rule -------------------------------------------------------------------------------------------
def test_a_dense_model_is_its_own_teacher(tmp_path):
    trainer = train_quietly(make_model("llama"), elsa_args(tmp_path, max_steps=4))
    assert trainer.teacher_model is not None and _distilled(trainer)


@pytest.mark.parametrize("how", ["peft_model", "peft_config", "keep_mask"])
def test_an_already_sparse_model_trains_without_distillation_and_says_so(how, tmp_path, caplog):
    model = _pruned()
    kwargs = {"peft_config": peft.LoraConfig(r=4, target_modules=["q_proj"])} if how == "peft_config" else {}
    model = _lora(model) if how == "peft_model" else model
    args = elsa_args(tmp_path, max_steps=3, keep_mask=how == "keep_mask")
    with caplog.at_level(logging.WARNING, logger="hf_elsa"):
        trainer = train_quietly(model, args, **kwargs)  # the PeftModel student crashed at the first step before
    lines = [r.getMessage() for r in caplog.records if "no distillation" in r.getMessage()]
    assert len(lines) == 1 and "teacher_model=" in lines[0]
    assert trainer._teacher is None and not _distilled(trainer)


@pytest.mark.parametrize("teacher_kind", ["plain", "peft"])
def test_lora_on_a_sparse_model_distils_from_a_given_teacher(teacher_kind, tmp_path):
    teacher = make_model("llama")  # the dense model the sparse one came from
    teacher = _lora(teacher) if teacher_kind == "peft" else teacher
    trainer = train_quietly(_lora(_pruned()), elsa_args(tmp_path, max_steps=3), teacher_model=teacher)
    distilled = _distilled(trainer)
    assert distilled and all(math.isfinite(x) and x > 0 for x in distilled)


def test_a_pruned_checkpoint_as_model_is_no_teacher(tmp_path, caplog):
    """``model=from_pretrained(checkpoint)``: 60% zeros, no masks attached -- counted as pruned, not copied."""
    model = make_model("llama")
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w.view(-1)[: int(0.6 * w.numel())] = 0
    with caplog.at_level(logging.WARNING, logger="hf_elsa"):
        trainer = train_quietly(model, elsa_args(tmp_path, max_steps=2))
    assert trainer._teacher is None and any("exactly zero" in r.getMessage() for r in caplog.records)


# -- resume ---------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    args = elsa_args(tmp_path / "a", max_steps=8, save_strategy="steps", save_steps=4)
    train_quietly(make_model("llama"), args, callbacks=[StopAt(4)])
    return str(tmp_path / "a" / "out" / "checkpoint-4")


def test_resume_with_the_pruned_checkpoint_as_model_is_refused_naming_both_teachers(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"trained with a teacher of 22,688 weights.*but it has no teacher"):
        train_quietly(pruned, elsa_args(tmp_path / "b", max_steps=8), resume=checkpoint)


def test_resume_with_another_teacher_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"checksum .* but it has a teacher of 22,688 weights with checksum"):
        train_quietly(make_model("llama", seed=3), elsa_args(tmp_path / "b", max_steps=8), resume=checkpoint)


def test_resume_with_the_dense_model_is_bit_identical(checkpoint, tmp_path):
    straight = make_model("llama")
    train_quietly(straight, elsa_args(tmp_path / "s", max_steps=8))
    resumed = make_model("llama")
    train_quietly(resumed, elsa_args(tmp_path / "b", max_steps=8), resume=checkpoint)
    for name, w in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], w), name


def test_fingerprint_tells_teachers_apart_and_survives_float_noise():
    a, b = fingerprint(make_model("llama")), fingerprint(make_model("llama", seed=1))
    assert not same_fingerprint(a, b) and same_fingerprint(a, dict(a))
    assert fingerprint(None)["elsa_teacher_numel"] == 0


def test_resume_with_foreign_optimizer_state_is_refused(tmp_path):
    """Another run's optimizer.pt (two runs sharing one output_dir): its mask does not fit these weights."""
    import shutil

    for run, text in (("a", 0), ("b", 5)):  # the same dense model (and teacher), other text: other masks
        args = elsa_args(tmp_path / run, max_steps=8, save_strategy="steps", save_steps=4)
        train_quietly(make_model("llama"), args, lm_dataset(48, seed=text), callbacks=[StopAt(4)])
    mixed = tmp_path / "a" / "out" / "checkpoint-4"
    shutil.copy(tmp_path / "b" / "out" / "checkpoint-4" / "optimizer.pt", mixed / "optimizer.pt")
    with pytest.raises(
        ValueError, match=r"resuming at step 4: \d+ weights are nonzero where the optimizer's fixed mask"
    ):
        train_quietly(make_model("llama"), elsa_args(tmp_path / "c", max_steps=8), resume=str(mixed))


# -- checks before any expensive step -------------------------------------------------------------------
def _refused(tmp_path, match, model=None, teacher=None, tokenizer=None, **overrides):
    with pytest.raises(ValueError, match=match):
        ElsaTrainer(
            model=model or make_model("llama"),
            args=elsa_args(tmp_path, **overrides),
            train_dataset=lm_dataset(8),
            teacher_model=teacher,
            processing_class=tokenizer,
        )


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    _refused(
        tmp_path, r"teacher_model predicts 160 tokens, the student 128", teacher=make_model("llama", vocab_size=160)
    )


def test_teacher_smaller_than_the_tokenizer_is_refused(tmp_path):
    student = make_model("llama", vocab_size=64)
    _refused(tmp_path, r"tokenizer has \d+ tokens but teacher_model embeds only 64", model=student,
             teacher=make_model("llama", vocab_size=64), tokenizer=make_char_tokenizer())  # fmt: skip


def test_hidden_state_distillation_needs_the_same_depth(tmp_path):
    deeper = make_model("llama", num_hidden_layers=3)
    _refused(tmp_path, r"teacher has 3 layers .* student 2", teacher=deeper, distill_hidden_weight=0.1)


def test_teacher_on_the_meta_device_is_refused(tmp_path):
    with torch.device("meta"):
        teacher = make_model("llama")
    _refused(tmp_path, r"parameters on the meta device", teacher=teacher)


def test_the_student_as_its_own_teacher_is_refused(tmp_path):
    model = make_model("llama")
    _refused(tmp_path, r"is the student model itself", model=model, teacher=model)


def test_a_teacher_with_distillation_off_is_refused(tmp_path):
    _refused(tmp_path, r"teacher_model=\.\.\.\) was given but distillation is off", teacher=make_model("llama"),
             distill_weight=0.0)  # fmt: skip


def test_a_vanishing_temperature_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"distill_temperature=1e-30 must be in \[0.1, 100.0\].*KL vanishes"):
        elsa_args(tmp_path, distill_temperature=1e-30)


def test_nan_in_a_teacher_is_named_before_the_warm_start(tmp_path, monkeypatch):
    import hf_elsa.oneshot

    pruner = type(hf_elsa.oneshot.PRUNERS.get("sparsegpt"))
    monkeypatch.setattr(pruner, "__call__", lambda *a, **k: pytest.fail("the warm start ran"))
    teacher = make_model("llama")
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("inf")  # tied: the embedding too
    with pytest.raises(ValueError, match=r"the teacher: 1 tensor holds NaN/inf values: 'model.embed_tokens.weight'"):
        train_quietly(make_model("llama"), elsa_args(tmp_path), teacher_model=teacher)


# -- the warm start -------------------------------------------------------------------------------------
def test_the_warm_start_runs_once_before_the_loop(tmp_path, monkeypatch):
    """It ran once per micro-batch of the first step under gradient accumulation: the second pruned the already
    pruned weights again and left stale masks that replaced the final projection (DDP then parted from one process)."""
    import hf_elsa.oneshot

    calls, pruner = [], type(hf_elsa.oneshot.PRUNERS.get("sparsegpt"))
    original = pruner.__call__

    def counting(self, model, *args, **kwargs):
        calls.append(model.training)
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(pruner, "__call__", counting)
    args = elsa_args(tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = train_quietly(make_model("llama"), args)
    assert len(calls) == 1 and trainer.warm_start_seconds > 0


def test_resume_skips_the_warm_start(checkpoint, tmp_path, monkeypatch):
    import hf_elsa.oneshot

    pruner = type(hf_elsa.oneshot.PRUNERS.get("sparsegpt"))
    monkeypatch.setattr(pruner, "__call__", lambda *a, **k: pytest.fail("the warm start ran on resume"))
    train_quietly(make_model("llama"), elsa_args(tmp_path / "b", max_steps=8), resume=checkpoint)


# -- best model -----------------------------------------------------------------------------------------
def test_best_model_is_a_fixed_mask_checkpoint(tmp_path):
    args = elsa_args(
        tmp_path, max_steps=12, admm_fraction=0.5, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
    )  # fmt: skip
    model = make_model("llama")
    trainer = train_quietly(model, args, eval_dataset=lm_dataset(8, seed=3))
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best >= trainer.elsa_optimizer.admm_steps == 6
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) >= round(0.7 * w.numel()), name


def test_best_model_with_admm_to_the_last_step_is_refused(tmp_path):
    _refused(tmp_path, r"load_best_model_at_end=True with admm_fraction=1.0", recipe="paper", eval_strategy="steps",
             save_strategy="steps", load_best_model_at_end=True)  # fmt: skip


# -- memory ---------------------------------------------------------------------------------------------
def test_estimate_memory_counts_the_teachers_shard_under_fsdp(tmp_path):
    model = make_model("llama")
    one = estimate_memory(model, elsa_args(tmp_path))
    args = elsa_args(tmp_path)
    args.fsdp = True  # as accelerate launch with an FSDP config sets it; the estimate only reads the flag
    two = estimate_memory(model, args, processes=2)
    assert one.teacher > 0 and two.teacher == -(-one.teacher // 2) and two.total < one.total
