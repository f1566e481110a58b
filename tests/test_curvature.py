"""Curvature estimates for the objective-aware projection: against hand computations."""

import pytest
import torch
from conftest import make_model, prunable_weights, ref_keep_mask

from hf_elsa import ElsaTrainer
from hf_elsa.admm import AdmmSettings, ElsaOptimizer
from hf_elsa.curvature import (
    ACT_NEW_SUM,
    ACT_NEW_TOKENS,
    ACT_SUM,
    ACT_TOKENS,
    ActivationStatistics,
    curvature_for,
    merge_statistics,
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
        h = curvature_for("activation", name, None, state)
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
    torch.testing.assert_close(curvature_for("activation", "w", None, state), torch.tensor([1.0, 1.0]))


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
        AdmmSettings(sparsity=0.6, importance="activation"),
        total_steps=4,
        transposed={"w"} if transposed else set(),
    )
    opt.state_for("w").update({ACT_SUM: h * 5, ACT_TOKENS: 5})
    mask = opt._keep_mask("w", p, p.detach(), 0.6)
    expected = ref_keep_mask(weight.abs() * h.sqrt()[None, :], 0.6, "unstructured")
    assert torch.equal(mask.t() if transposed else mask, expected)


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
