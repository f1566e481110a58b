"""SAM (SAFE) and Sassha: against hand computations."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_dataset, make_model, prunable_weights
from transformers import TrainerCallback

from hf_elsa import ElsaTrainer, Sassha
from hf_elsa.curvature import HESSIAN, SASSHA_HESSIAN, probe_generator, rademacher_like
from hf_elsa.flatness import perturbed, sam_perturbation
from hf_elsa.projection import importance_score


# ---------------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------------
def test_sam_perturbation_uses_one_global_norm():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]])]
    e = sam_perturbation(grads, rho=0.5)
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))  # 0.5 * 3 / 5
    torch.testing.assert_close(e[1], torch.tensor([[0.0], [0.4]]))
    assert sam_perturbation([torch.zeros(3)], rho=1.0)[0].eq(0).all()  # eps guards a zero gradient


def test_perturbed_restores_exactly_where_subtraction_would_not():
    x = torch.nn.Parameter(torch.tensor([1e-8, 0.1, 3.0]))
    e = [torch.tensor([1.0, 0.7, -1e-3])]
    assert not torch.equal((x.detach() + e[0]) - e[0], x.detach())  # x + e - e != x in fp32
    original = x.detach().clone()
    with perturbed([x], e):
        torch.testing.assert_close(x.detach(), original + e[0])
    assert torch.equal(x.detach(), original)
    with pytest.raises(RuntimeError), perturbed([x], e):
        raise RuntimeError("boom")
    assert torch.equal(x.detach(), original)


# ---------------------------------------------------------------------------------------------------
# SAFE in the trainer: the gradient the optimizer receives is the gradient at x + e
# ---------------------------------------------------------------------------------------------------
class _Recording(ElsaTrainer):
    """Records the micro-batches of the first pass (the replay goes through Trainer.training_step)."""

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self.seen = [*getattr(self, "seen", []), {k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)


class _GradientSpy(TrainerCallback):
    """Gradient and weights right before the optimizer step (after clipping, before the ADMM penalty)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def _window_loss(model, batches):
    """The window's loss as the Trainer scales it: summed token NLL over all micro-batches / their token count."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        count += int((labels != -100).sum())
    return total / count


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_gradient_is_taken_at_the_perturbed_point(accumulation, make_args):
    rho = 0.05
    model = make_model("llama")
    initial = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = _GradientSpy()
    args = make_args(
        recipe="paper",  # ADMM from the first step: nothing masked, the weights are the initial ones
        max_steps=1,
        sam_rho=rho,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=4 // accumulation,
    )
    trainer = _Recording(model=model, args=args, train_dataset=lm_dataset(8), callbacks=[spy])
    trainer.train()
    assert len(trainer.seen) == accumulation

    names = [n for n, _ in initial.named_parameters()]
    params = list(initial.parameters())
    grads = torch.autograd.grad(_window_loss(initial, trainer.seen), params)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
    perturbed_grads = torch.autograd.grad(_window_loss(initial, trainer.seen), params)

    assert set(spy.grads) == set(names)
    for name, g_plain, g_sam in zip(names, grads, perturbed_grads):
        torch.testing.assert_close(spy.grads[name], g_sam, rtol=1e-4, atol=1e-6, msg=name)
    assert max((a - b).abs().max() for a, b in zip(grads, perturbed_grads)) > 1e-4  # SAM changed the gradient
    for name, weight in start.items():
        assert torch.equal(spy.weights[name], weight), name  # x restored bit for bit before the step


def test_sam_keeps_pruned_weights_at_zero_in_the_fixed_mask_phase(make_args):
    model = make_model("llama")
    trainer = ElsaTrainer(
        model=model,
        args=make_args(
            sam_rho=0.05, max_steps=6, admm_fraction=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=2
        ),
        train_dataset=lm_dataset(32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) == round(w.numel() * 0.7), name


# ---------------------------------------------------------------------------------------------------
# Sassha on a quadratic f(x) = x^T A x / 2: Hessian A, gradient A x
# ---------------------------------------------------------------------------------------------------
def _quadratic():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.t() + torch.eye(4, dtype=torch.float64)  # symmetric positive definite, not diagonal
    x0 = torch.randn(4, generator=gen, dtype=torch.float64)
    return a, x0


def _hand_sassha(a, x0, steps, lr, betas, eps, wd, rho, interval, seed):
    """Sassha's update rule written out for the quadratic."""
    b1, b2 = betas
    x, m, d_ema, refreshes, trajectory = x0.clone(), torch.zeros(4, dtype=a.dtype), torch.zeros(4, dtype=a.dtype), 0, []
    for t in range(1, steps + 1):
        g = a @ x
        e = rho * g / (g.norm() + 1e-12)
        g_sam = a @ (x + e)
        if (t - 1) % interval == 0:
            z = rademacher_like([x], probe_generator(seed, refreshes))[0]
            d_ema = b2 * d_ema + (1 - b2) * (z * (a @ z)).abs()  # Hessian of a quadratic: A, at any point
            refreshes += 1
        m = b1 * m + (1 - b1) * g_sam
        m_hat, d_hat = m / (1 - b1**t), d_ema / (1 - b2**refreshes)
        x = x * (1 - lr * wd) - lr * m_hat / (d_hat.sqrt() + eps)
        trajectory.append(x.clone())
    return trajectory


def test_sassha_steps_match_the_hand_derived_update():
    a, x0 = _quadratic()
    hyper = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-4, "weight_decay": 0.1, "rho": 0.05}
    x = torch.nn.Parameter(x0.clone())
    opt = Sassha([x], hessian_interval=2, seed=7, **hyper)
    expected = _hand_sassha(a, x0, steps=4, interval=2, seed=7, wd=hyper.pop("weight_decay"), **hyper)
    for t, target in enumerate(expected):
        opt.zero_grad()
        before = x.detach().clone()
        loss = opt.step(lambda: 0.5 * x @ a @ x)
        torch.testing.assert_close(loss, 0.5 * before @ a @ before)  # the loss at x
        torch.testing.assert_close(x.detach(), target, rtol=1e-10, atol=1e-12, msg=f"step {t + 1}")
    assert opt.refreshes_done == 2 and opt.steps_done == 4
    assert not torch.equal(opt.state[x][SASSHA_HESSIAN], torch.diagonal(a).abs())  # |z*Az| != diag(A) here


def test_sassha_uses_gradients_already_computed_by_backward():
    a, x0 = _quadratic()
    x1, x2 = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    opt1, opt2 = Sassha([x1], lr=0.1), Sassha([x2], lr=0.1)
    opt1.step(lambda: 0.5 * x1 @ a @ x1)
    (0.5 * x2 @ a @ x2).backward()  # the usual torch pattern first, then a forward-only closure
    calls = []
    opt2.step(lambda: calls.append(1) or 0.5 * x2 @ a @ x2)
    assert len(calls) == 1  # only at the perturbed point
    torch.testing.assert_close(x1.detach(), x2.detach(), rtol=1e-12, atol=1e-14)


def test_sassha_without_closure_needs_a_hessian_estimate():
    x = torch.nn.Parameter(torch.ones(3))
    x.grad = torch.ones(3)
    opt = Sassha([x], lr=0.1, eps=0.0, rho=0.0)
    with pytest.raises(RuntimeError, match="update_hessian"):
        opt.step()
    opt.update_hessian({x: torch.full((3,), 4.0)})
    opt.step()  # m_hat = g, D_hat = 4: x -= 0.1 * 1 / 2
    torch.testing.assert_close(x.detach(), torch.full((3,), 0.95))


def test_sassha_rejects_bad_hyper_parameters():
    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="hessian_interval"):
        Sassha([x], hessian_interval=0)
    with pytest.raises(ValueError, match="betas"):
        Sassha([x], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="rho"):
        Sassha([x], rho=-1.0)


# ---------------------------------------------------------------------------------------------------
# Sassha as ElsaTrainer's base optimizer
# ---------------------------------------------------------------------------------------------------
def test_trainer_sassha_step_equals_a_standalone_sassha_step(make_args):
    """lambda = 0 and sparsity 0: the ADMM wrapper changes nothing, so one trainer step is one Sassha step."""
    model = make_model("llama")
    reference = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(
        base_optimizer="sassha",
        recipe="paper",
        admm_lambda=0.0,
        sparsity=0.0,
        max_steps=1,
        sam_rho=0.05,
        max_grad_norm=0.0,
        weight_decay=0.1,
        hessian_interval=1,
    )
    trainer = _Recording(model=model, args=args, train_dataset=lm_dataset(8))
    trainer.train()
    assert isinstance(trainer.sassha_optimizer, Sassha)

    decay = set(trainer.get_decay_parameter_names(reference))  # the Trainer's groups, in the Trainer's order
    named = list(reference.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = Sassha(
        groups,
        lr=args.learning_rate,
        betas=(0.9, 0.95),
        eps=args.adam_epsilon,
        rho=0.05,
        seed=args.seed,
        hessian_interval=1,
    )
    (batch,) = trainer.seen
    opt.step(lambda: reference(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    changed = 0
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        changed += int(not torch.equal(got, start[name]))
    assert changed == len(named)


def test_trainer_sassha_feeds_the_hutchinson_projection(make_args):
    model = make_model("llama")
    args = make_args(
        base_optimizer="sassha",
        importance="hutchinson",
        recipe="paper",
        admm_lambda=0.1,
        sam_rho=0.01,
        hessian_interval=2,
        max_steps=6,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    trainer = ElsaTrainer(model=model, args=args, train_dataset=lm_dataset(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    opt = trainer.elsa_optimizer
    for name, module in trainer.prunable_modules.items():
        state = opt.state_for(name)
        assert HESSIAN not in state  # no second estimate: Sassha's D serves the projection
        assert state["hessian_refreshes"] == 3  # steps 0, 2, 4
        w = module.weight
        expected = importance_score(w, state[SASSHA_HESSIAN], 1.0)
        torch.testing.assert_close(opt._score(name, w, w.detach()), expected)
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) == round(w.numel() * 0.7), name


def test_trainer_sassha_refuses_a_user_optimizer(make_args):
    model = make_model("llama")
    user = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer='sassha'"):
        ElsaTrainer(
            model=model, args=make_args(base_optimizer="sassha"), train_dataset=lm_dataset(4), optimizers=(user, None)
        )
