"""Curvature estimates for the objective-aware projection: against hand computations."""

import pytest
import torch
from conftest import make_model, prunable_weights, ref_keep_mask

from hf_elsa import ElsaSettings, ElsaTrainer
from hf_elsa.admm import ElsaOptimizer
from hf_elsa.curvature import (
    ACT_NEW_SUM,
    ACT_NEW_TOKENS,
    ACT_SUM,
    ACT_TOKENS,
    FISHER,
    FISHER_COUNT,
    HESSIAN,
    HESSIAN_COUNT,
    SASSHA_HESSIAN,
    ActivationStatistics,
    get_estimator,
    hutchinson_diagonal,
    merge_statistics,
    probe_generator,
    rademacher_like,
    update_running_mean,
)
from hf_elsa.targets import find_prunable_modules


def _inputs_of(model, ids):
    """Hand reference: the input of every prunable layer on ``ids``, captured by plain hooks."""
    seen, handles = {}, []
    for name, module in find_prunable_modules(model).items():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0].detach())))
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_statistics_equal_hand_computed_column_means(arch):
    model = make_model(arch).train()
    modules = find_prunable_modules(model)
    states = {name: {} for name in modules}
    stats = ActivationStatistics(modules, states.__getitem__)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    stats.attach()
    model(input_ids=ids)
    model(input_ids=ids[:1])
    stats.remove()
    reference = _inputs_of(model, ids)
    for name, state in states.items():
        x = reference[name].reshape(-1, reference[name].shape[-1])
        x1 = x[:16]  # the second forward saw the first sequence again
        expected_sum = x.square().sum(0) + x1.square().sum(0)
        assert state[ACT_NEW_TOKENS] == 48 + 16
        torch.testing.assert_close(state[ACT_NEW_SUM], expected_sum, rtol=1e-5, atol=1e-6)
        merge_statistics(state)
        h = get_estimator("activation").curvature(name, state)
        torch.testing.assert_close(h, expected_sum / 64, rtol=1e-5, atol=1e-6)
        assert ACT_NEW_SUM not in state and state[ACT_TOKENS] == 64


def test_activation_statistics_skip_eval_forwards_and_removed_hooks():
    model = make_model("llama")
    modules = find_prunable_modules(model)
    states = {name: {} for name in modules}
    stats = ActivationStatistics(modules, states.__getitem__)
    stats.attach()
    model.eval()(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert all(not s for s in states.values())
    stats.remove()
    model.train()(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert all(not s for s in states.values())
    assert all(not m._forward_pre_hooks for m in modules.values())


def test_merge_statistics_accumulates_over_merges():
    state = {ACT_NEW_SUM: torch.tensor([1.0, 4.0]), ACT_NEW_TOKENS: 2}
    merge_statistics(state)
    state.update({ACT_NEW_SUM: torch.tensor([3.0, 0.0]), ACT_NEW_TOKENS: 2})
    merge_statistics(state)
    torch.testing.assert_close(state[ACT_SUM], torch.tensor([4.0, 4.0]))
    assert state[ACT_TOKENS] == 4
    torch.testing.assert_close(get_estimator("activation").curvature("w", state), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("transposed", [False, True])
def test_activation_score_is_wanda_metric_per_tensor(transposed):
    """Score h_j * W_ij^2 keeps the top-k of |W_ij| * ||X_j|| over the whole tensor."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=gen)  # (out, in)
    h = torch.rand(10, generator=gen) * 10
    stored = weight.t().contiguous() if transposed else weight
    p = torch.nn.Parameter(stored.clone())
    opt = ElsaOptimizer(
        torch.optim.SGD([p], lr=0.1),
        {"w": p},
        ElsaSettings(recipe="paper", sparsity=0.6, importance="activation"),
        total_steps=4,
        transposed={"w"} if transposed else set(),
    )
    opt.state_for("w").update({ACT_SUM: h * 5, ACT_TOKENS: 5})
    mask = opt._keep_mask("w", p, p.detach(), 0.6)
    expected = ref_keep_mask(weight.abs() * h.sqrt()[None, :], 0.6, "unstructured")
    assert torch.equal(mask.t() if transposed else mask, expected)


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_trainer_with_activation_importance(make_args, dataset_factory):
    model = make_model("llama")
    trainer = ElsaTrainer(
        model=model,
        args=make_args(sparsity=0.7, max_steps=10, importance="activation", admm_fraction=0.6),
        train_dataset=dataset_factory(),
    )
    trainer.train()
    for name, weight in prunable_weights(model).items():
        assert int((weight == 0).sum()) == round(weight.numel() * 0.7), name
        state = trainer.elsa_optimizer.state_for(name)
        assert state[ACT_TOKENS] > 0 and state[ACT_SUM].shape == (weight.shape[1],)
    # hooks are gone once training ends
    assert all(not m._forward_pre_hooks for m in trainer.prunable_modules.values())


# ---------------------------------------------------------------------------------------------------
# running estimates, Fisher, Hutchinson
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_running_mean_is_the_bias_corrected_ema(beta):
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(5, generator=gen) for _ in range(6)]
    state = {}
    ema = torch.zeros(5, dtype=torch.float64)
    for t, v in enumerate(values, start=1):
        update_running_mean(state, "est", "n", v, beta)
        ema = beta * ema + (1 - beta) * v.double()  # Adam's EMA ...
        torch.testing.assert_close(state["est"].double(), ema / (1 - beta**t), rtol=1e-6, atol=1e-7)  # ... corrected
        assert state["n"] == t


def test_fisher_is_the_ema_of_squared_task_gradients_without_the_penalty():
    """ElsaOptimizer.step folds grad**2 in *before* adding lambda (W - z + u) to the gradient."""
    beta = 0.8
    w = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    opt = ElsaOptimizer(
        torch.optim.SGD([w], lr=0.05),
        {"w": w},
        ElsaSettings(
            recipe="paper",
            sparsity=0.5,
            importance="fisher",
            importance_beta=beta,
            admm_penalty="gradient",
            admm_lambda=0.5,
        ),
        total_steps=10,
    )
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    ema = torch.zeros(4, 6, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        assert not torch.equal(w.grad, g)  # the penalty did join the gradient afterwards
        ema = beta * ema + (1 - beta) * g.double().square()
        state = opt.state_for("w")
        torch.testing.assert_close(state[FISHER].double(), ema / (1 - beta**t), rtol=1e-6, atol=1e-8)
        assert state[FISHER_COUNT] == t
    h = get_estimator("fisher").curvature("w", opt.state_for("w"))
    expected = ref_keep_mask((h + 1e-12) * w.detach().square(), 0.5, "unstructured")
    assert torch.equal(opt._keep_mask("w", w, w.detach(), 0.5), expected)


def test_importance_delta_reaches_the_score():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    opt = ElsaOptimizer(
        torch.optim.SGD([w], lr=0.1),
        {"w": w},
        ElsaSettings(recipe="paper", importance="fisher", importance_alpha=0.5, importance_delta=0.25),
        total_steps=4,
    )
    opt.state_for("w")[FISHER] = torch.tensor([[0.0, 0.75, 2.0, 0.0]])
    expected = torch.tensor([[0.25, 1.0, 2.25, 0.25]]).sqrt() * w.detach().square()
    torch.testing.assert_close(opt._score("w", w, w.detach()), expected)


def test_hutchinson_estimator_prefers_the_elsa_estimate_then_sasshas():
    own, sassha = torch.ones(2), torch.full((2,), 3.0)
    assert get_estimator("hutchinson").curvature("w", {HESSIAN: own, SASSHA_HESSIAN: sassha}) is own
    assert get_estimator("hutchinson").curvature("w", {SASSHA_HESSIAN: sassha}) is sassha
    assert get_estimator("hutchinson").curvature("w", {}) is None
    assert get_estimator("fisher").curvature("w", {}) is None


def test_rademacher_probes_are_signs_and_reproducible():
    shapes = [torch.empty(3, 4), torch.empty(7)]
    a = rademacher_like(shapes, probe_generator(5, 2))
    b = rademacher_like(shapes, probe_generator(5, 2))
    c = rademacher_like(shapes, probe_generator(5, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(set(x.unique().tolist()) <= {-1.0, 1.0} for x in a)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """With H diagonal, z * Hz = z^2 diag(H) = diag(H) for any signs z: one probe is exact."""
    a = torch.tensor([3.0, -0.5, 2.0, 0.0])
    x = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    loss = 0.5 * (a * x**2).sum() + x.sum()  # the linear term has no curvature
    (grad,) = torch.autograd.grad(loss, [x], create_graph=True)
    (d,) = hutchinson_diagonal([grad], [x], probe_generator(0, 0))
    torch.testing.assert_close(d, a.abs())


def _tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def test_hutchinson_converges_to_the_exact_hessian_diagonal():
    """Against torch.autograd.functional.hessian on a 26-parameter MLP.

    mean_k z_k * H z_k over N probes has per-entry variance sum_{j != i} H_ij^2 / N; the tolerance is 5 of
    those standard errors (plus 1e-9), computed from the exact Hessian.
    """
    model = _tiny_mlp()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = list(model.parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def loss_of(flat):
        chunks = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], chunks)), (x,))
        return ((out - y) ** 2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    exact = hessian.diagonal()
    assert exact.abs().max() > 1e-3 and (hessian - torch.diag(exact)).abs().max() > 1e-3  # not diagonal

    n_probes = 2000
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    estimate = torch.cat([d.reshape(-1) for d in hutchinson_diagonal(grads, params, probe_generator(0, 0), n_probes)])
    off_diagonal_sq = (hessian**2).sum(1) - exact**2
    tolerance = 5 * (off_diagonal_sq / n_probes).sqrt() + 1e-9
    assert ((estimate.double() - exact.abs()).abs() <= tolerance).all()
    # and one probe is far from it on this non-diagonal Hessian (the test could fail)
    grads = torch.autograd.grad(((model(x) - y) ** 2).mean(), params, create_graph=True)
    single = torch.cat([d.reshape(-1) for d in hutchinson_diagonal(grads, params, probe_generator(0, 0), 1)])
    assert not ((single.double() - exact.abs()).abs() <= tolerance).all()


def test_trainer_hessian_diagonal_matches_a_hand_computation(make_args, dataset_factory):
    """The trainer's estimate on a micro-batch is hutchinson_diagonal of that micro-batch's mean loss."""
    model = make_model("llama")
    trainer = ElsaTrainer(model=model, args=make_args(importance="hutchinson"), train_dataset=dataset_factory())
    batch = dataset_factory(4)[:4]
    params = [m.weight for m in trainer.prunable_modules.values()]
    got = trainer._hessian_diagonal(model, batch, params, probe_generator(3, 1))
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    expected = hutchinson_diagonal(grads, params, probe_generator(3, 1))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the estimate leaves .grad alone


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_trainer_refreshes_hutchinson_every_interval_and_projects_with_it(make_args, dataset_factory):
    model = make_model("llama")
    args = make_args(importance="hutchinson", hessian_interval=3, max_steps=8, recipe="paper", admm_lambda=0.1)
    trainer = ElsaTrainer(model=model, args=args, train_dataset=dataset_factory())
    trainer.train()
    for name, weight in prunable_weights(model).items():
        state = trainer.elsa_optimizer.state_for(name)
        assert state[HESSIAN_COUNT] == 3  # steps 0, 3, 6 of 8
        assert state[HESSIAN].shape == trainer.prunable_modules[name].weight.shape
        assert (state[HESSIAN] >= 0).all() and state[HESSIAN].sum() > 0
        assert int((weight == 0).sum()) == round(weight.numel() * 0.7), name


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_hutchinson_runs_with_sdpa_attention(make_args, dataset_factory):
    """SDPA's CPU flash kernel has no double backward; the estimate forces the math kernel."""
    model = make_model("llama")
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    trainer = ElsaTrainer(
        model=model,
        args=make_args(importance="hutchinson", max_steps=2, recipe="paper"),
        train_dataset=dataset_factory(),
    )
    trainer.train()
    state = trainer.elsa_optimizer.state_for(next(iter(trainer.prunable_modules)))
    assert state[HESSIAN_COUNT] == 1


def test_hutchinson_refuses_attention_without_double_backward(make_args, dataset_factory):
    model = make_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        ElsaTrainer(model=model, args=make_args(importance="hutchinson"), train_dataset=dataset_factory())
    with pytest.raises(ValueError, match="base_optimizer='sassha'"):
        ElsaTrainer(model=model, args=make_args(base_optimizer="sassha"), train_dataset=dataset_factory())


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_hutchinson_runs_with_non_reentrant_gradient_checkpointing(make_args, dataset_factory):
    model = make_model("llama")
    args = make_args(importance="hutchinson", max_steps=2, recipe="paper", activation_checkpointing=True)
    trainer = ElsaTrainer(model=model, args=args, train_dataset=dataset_factory())
    trainer.train()
    assert model.model.gradient_checkpointing
    state = trainer.elsa_optimizer.state_for(next(iter(trainer.prunable_modules)))
    assert state[HESSIAN_COUNT] == 1 and state[HESSIAN].sum() > 0
