"""Distillation from the dense model: the chunked KL against a direct one, the trainer glue against exact runs."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import StopAt, elsa_args, lm_dataset, make_model, train_quietly

from hf_elsa import ElsaConfig, ElsaTrainer, estimate_memory
from hf_elsa.distillation import chunked_kl, hidden_state_loss, next_token_mask


def _direct_kl(student, teacher, temperature):
    p = F.softmax(teacher.double() / temperature, -1)
    return (p * (p.log() - F.log_softmax(student.double() / temperature, -1))).sum()


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_chunked_kl_equals_the_direct_kl_and_its_gradient(chunk, temperature):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(10, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(10, 17, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0, 2, 3, 5, 8, 9])  # masked positions left out
    got = chunked_kl(student, teacher[rows], temperature, rows=rows, chunk_tokens=chunk)
    expected = _direct_kl(student[rows], teacher[rows], temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    (g_got,) = torch.autograd.grad(got, student)
    (g_exp,) = torch.autograd.grad(_direct_kl(student[rows], teacher[rows], temperature), student)
    torch.testing.assert_close(g_got.double(), g_exp, rtol=1e-5, atol=1e-7)
    assert torch.all(g_got[[1, 4, 6, 7]] == 0)  # no gradient where the mask is off


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_has_the_direct_kl_hessian_vector_product(temperature):
    # Hutchinson and Sassha differentiate the gradient again (create_graph=True): the closed-form backward must be
    # differentiable and give the KL's own curvature
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    direction = torch.randn(6, 9, generator=gen, dtype=torch.float64)

    def hvp(loss):
        (grad,) = torch.autograd.grad(loss, student, create_graph=True)
        return torch.autograd.grad((grad * direction).sum(), student)[0]

    got = hvp(chunked_kl(student, teacher, temperature, chunk_tokens=4))
    torch.testing.assert_close(got.double(), hvp(_direct_kl(student, teacher, temperature)), rtol=1e-5, atol=1e-7)


def test_chunked_kl_takes_the_teacher_one_chunk_at_a_time():
    student = torch.randn(9, 5, requires_grad=True)
    teacher = torch.randn(9, 5)
    asked = []

    def teacher_logits(part):
        asked.append((part.start, part.stop))
        return teacher[part]

    got = chunked_kl(student, teacher_logits, 1.0, chunk_tokens=4)
    assert asked == [(0, 4), (4, 8), (8, 9)]
    torch.testing.assert_close(got, _direct_kl(student, teacher, 1.0).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_kl_of_identical_distributions_is_exactly_zero(seed):
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(seed)) * 4
    assert float(chunked_kl(logits, logits, 1.0)) == 0.0


def test_hidden_state_loss_against_a_hand_computation():
    h0 = torch.zeros(1, 2, 3)  # embeddings: skipped
    s1, t1 = torch.tensor([[[1.0, 0, 0], [0, 2, 0]]]), torch.tensor([[[2.0, 0, 0], [0, 1, 0]]])
    s2, t2 = torch.tensor([[[0.0, 0, 1], [1, 1, 1]]]), torch.tensor([[[0.0, 0, 2], [1, 1, 1]]])
    mask = torch.tensor([[True, False]])
    # token 0 only: layer 1 (1-2)^2 / 4 = 0.25, layer 2 (1-2)^2 / 4 = 0.25 -> mean over layers 0.25
    assert float(hidden_state_loss([h0, s1, s2], [h0, t1, t2], mask)) == pytest.approx(0.25)
    both = torch.tensor([[True, True]])
    # token 1: layer 1 (2-1)^2 / 1 = 1, layer 2: 0 -> mean 0.5; total 0.25 + 0.5
    assert float(hidden_state_loss([h0, s1, s2], [h0, t1, t2], both)) == pytest.approx(0.75)


def test_next_token_mask_follows_the_labels():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, 3]])
    assert next_token_mask(labels).tolist() == [[True, False, True, False], [True, True, True, False]]


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------


def test_weight_zero_is_exactly_the_plain_run(tmp_path, monkeypatch):
    plain, zero = make_model("llama"), make_model("llama")
    trainer = train_quietly(zero, elsa_args(tmp_path / "b", distill_weight=0.0))
    assert trainer.teacher_model is None and trainer._teacher is None
    # the plain Trainer loss, with ElsaTrainer's distillation path out of the way
    monkeypatch.setattr(ElsaTrainer, "compute_loss", transformers.Trainer.compute_loss)
    train_quietly(plain, elsa_args(tmp_path / "a", distill_weight=0.0))
    for name, w in plain.state_dict().items():
        assert torch.equal(zero.state_dict()[name], w), name


def test_distillation_changes_the_run_and_leaves_the_teacher_untouched(tmp_path):
    model = make_model("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = train_quietly(model, elsa_args(tmp_path, distill_weight=0.5, save_strategy="steps", save_steps=6))
    teacher = trainer.teacher_model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, w in teacher.state_dict().items():
        assert torch.equal(w, dense[name]), name
    logged = [h for h in trainer.state.log_history if "loss_distill" in h]
    assert logged and all(math.isfinite(h["loss_ce"]) and h["loss_distill"] >= 0 for h in logged)
    assert logged[-1]["loss_distill"] > 0  # the pruned student drifted from its dense teacher
    # the teacher is never written into checkpoints
    for folder, _, files in os.walk(tmp_path / "out"):
        for f in files:
            assert "teacher" not in f, os.path.join(folder, f)
    reference = make_model("llama")
    train_quietly(reference, elsa_args(tmp_path / "plain"))
    assert not torch.equal(reference.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"])


def test_distillation_only_with_a_teacher_equal_to_the_student_has_zero_kl_at_the_start(tmp_path):
    model = make_model("llama")
    # the magnitude start: no one-shot pruning before the first forward, so the student is still the dense model
    args = elsa_args(
        tmp_path, distill_weight=1.0, max_steps=1, logging_steps=1, admm_fraction=1.0, admm_init="magnitude"
    )
    trainer = train_quietly(model, args)
    first = next(h for h in trainer.state.log_history if "loss_distill" in h)
    assert abs(first["loss_distill"]) < 1e-6  # the dense copy equals the student before the first update


@pytest.mark.parametrize("accumulation,sam_rho", [(1, 0.0), (2, 0.0), (1, 0.05)])
def test_logged_parts_are_per_step_means_that_add_up_to_the_logged_loss(accumulation, sam_rho, tmp_path):
    w = 0.25
    args = elsa_args(
        tmp_path,
        distill_weight=w,
        max_steps=6,
        logging_steps=3,
        sam_rho=sam_rho,
        gradient_accumulation_steps=accumulation,
    )
    trainer = train_quietly(make_model("llama"), args)
    logged = [h for h in trainer.state.log_history if "loss_distill" in h]
    assert len(logged) == 2
    for h in logged:
        assert h["loss"] == pytest.approx((1 - w) * h["loss_ce"] + w * h["loss_distill"], rel=1e-3)


def test_a_given_teacher_is_used(tmp_path):
    teacher = make_model("llama", seed=7)
    model = make_model("llama")
    trainer = train_quietly(model, elsa_args(tmp_path, distill_weight=1.0, max_steps=2), teacher_model=teacher)
    assert trainer.teacher_model is teacher
    first = next(h for h in trainer.state.log_history if "loss_distill" in h)
    assert first["loss_distill"] > 1e-3


@pytest.mark.parametrize("hidden", [0.0, 1.0])
def test_gradient_accumulation_equals_one_big_batch(hidden, tmp_path):
    dataset = lm_dataset(48)
    # The magnitude start: after SparseGPT's start Adam's first step moves every pruned zero by about +-lr, and the
    # mask fix then chooses among those near-ties by float rounding, which a different summation order (one batch
    # vs two accumulated halves) changes. This test is about the distillation terms' normalisation.
    common = dict(
        distill_weight=0.7, distill_hidden_weight=hidden, max_steps=6, learning_rate=3e-3, admm_init="magnitude"
    )
    one, two = make_model("llama"), make_model("llama")
    train_quietly(one, elsa_args(tmp_path / "a", per_device_train_batch_size=4, **common), dataset)
    train_quietly(
        two, elsa_args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common), dataset
    )
    for name, w in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], w, rtol=0, atol=1e-6, msg=name)


def test_resume_with_distillation_equals_a_straight_run(tmp_path):
    dataset = lm_dataset(48)
    common = dict(distill_weight=1.0, max_steps=12, learning_rate=3e-3)
    straight = make_model("llama")
    train_quietly(straight, elsa_args(tmp_path / "a", **common), dataset)
    interrupted = make_model("llama")
    train_quietly(
        interrupted,
        elsa_args(tmp_path / "b", save_strategy="steps", save_steps=6, **common),
        dataset,
        callbacks=[StopAt(6)],
    )
    # the same script run again: the dense model is passed in, the checkpoint restores the pruned student
    resumed = make_model("llama")
    train_quietly(
        resumed, elsa_args(tmp_path / "c", **common), dataset, resume=str(tmp_path / "b" / "out" / "checkpoint-6")
    )
    for name, w in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], w, rtol=0, atol=1e-6, msg=name)


def test_sam_replays_the_distillation_loss(tmp_path, monkeypatch):
    calls = []
    original = ElsaTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        calls.append(self._distill_sums.get("loss_distill"))
        return loss

    monkeypatch.setattr(ElsaTrainer, "compute_loss", counting)
    train_quietly(
        make_model("llama"), elsa_args(tmp_path, distill_weight=1.0, sam_rho=0.05, max_steps=2, logging_steps=10)
    )
    # 2 steps x (first pass + SAM replay): every pass added a distillation term
    assert len(calls) == 4 and all(c is not None for c in calls) and calls == sorted(calls)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"distill_weight": 1.5}, "distill_weight"),
        ({"distill_weight": float("nan")}, "distill_weight"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
        ({"distill_temperature": float("inf")}, "distill_temperature"),
        ({"distill_hidden_weight": -1.0}, "distill_hidden_weight"),
    ],
)
def test_bad_distillation_settings_name_the_field(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match=f"ElsaConfig.{field}="):
        ElsaConfig(output_dir=str(tmp_path), **kwargs)


def test_estimate_memory_counts_the_teacher(tmp_path):
    model = make_model("llama")
    plain = estimate_memory(model, elsa_args(tmp_path, distill_weight=0.0))
    taught = estimate_memory(model, elsa_args(tmp_path))  # the default recipe distils
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plain.teacher == 0 and taught.teacher == weights
    assert taught.total - plain.total == weights and "teacher" in taught.summary()
