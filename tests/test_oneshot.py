"""One-shot pruners (hf_elsa.oneshot): exact patterns, the math of each method, every architecture.

Tiny random models built from configs (fp32, seeded, offline); the whole file runs in seconds.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from architectures import ARCHITECTURES as CONFIGS
from architectures import VOCAB
from torch import nn

from hf_elsa.data import token_blocks
from hf_elsa.oneshot import PRUNERS, magnitude, sparsegpt, sparsegpt_prune_weight, wanda, wanda_score
from hf_elsa.oneshot._sequential import as_token_ids, find_decoder_layers, prune_layerwise
from hf_elsa.oneshot.wanda import InputNorms
from hf_elsa.projection import keep_mask
from hf_elsa.targets import find_prunable_modules, is_transposed


def _variant(name: str, **changes):
    """A config of the shared table (tests/architectures.py) with changes that reach a path the plain one does not."""

    def build():
        config = CONFIGS[name]()
        return type(config)(**{**config.to_dict(), **changes})

    return build


# the shared table of architectures, plus variants whose layout the sequential driver must handle
ARCHITECTURES = {
    **CONFIGS,
    # word_embed_proj_dim != hidden_size adds project_in/project_out Linears outside the decoder layers
    "opt_projected": _variant("opt", word_embed_proj_dim=16),
    # mixed layer types: layer 0 full attention, layer 1 a 4-token sliding window (its own mask)
    "qwen2_sliding": _variant(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None
    ),
    # three layers of two types, each with its own mask and rotary embedding
    "gemma3_mixed": _variant(
        "gemma3",
        num_hidden_layers=3,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch]()
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


def _calibration(num_samples: int = 6, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (num_samples, seqlen), generator=torch.Generator().manual_seed(seed))


def _oriented(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if is_transposed(module) else tensor


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0 if is_transposed(module) else 1]


def _run(method: str, model: nn.Module, sparsity: float, sparsity_type: str, **kwargs):
    """The registered pruner ``method``, with calibration blocks when it needs them."""
    pruner = PRUNERS.get(method)
    calibration = _calibration() if pruner.requires_calibration else None
    return pruner(model, calibration, sparsity, sparsity_type, batch_size=4, progress=False, **kwargs)


def _assert_pattern(pruned: torch.Tensor, sparsity: float, group: str) -> None:
    """Exact zero count of an (out, in) ``pruned`` bool matrix per comparison group."""
    rows, cols = pruned.shape
    if group == "unstructured":
        assert int(pruned.sum()) == round(rows * cols * sparsity)
    elif group == "row":
        assert (pruned.sum(dim=1) == round(cols * sparsity)).all()
    else:
        n, m = map(int, group.split(":"))
        assert (pruned.reshape(-1, m).sum(dim=1) == m - n).all()


# --------------------------------------------------------------------------------------------------
# exact sparsity and pattern, masks consistent with the zeros


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights are (in, out)
@pytest.mark.parametrize(
    "sparsity_type, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("row", 0.7), ("2:4", 0.5)]
)
@pytest.mark.parametrize("method", list(PRUNERS))
def test_exact_sparsity_and_pattern(method, sparsity_type, sparsity, arch):
    model = _model(arch)
    masks = _run(method, model, sparsity, sparsity_type)
    modules = find_prunable_modules(model)
    assert set(masks) == set(modules)
    # Wanda compares per output row for unstructured sparsity (its paper's choice)
    group = "row" if (method == "wanda" and sparsity_type == "unstructured") else sparsity_type
    for name, module in modules.items():
        keep = masks[name]
        assert keep.dtype == torch.bool and keep.shape == module.weight.shape
        assert torch.equal(module.weight == 0, ~keep), name  # zeros exactly where the mask prunes
        _assert_pattern(_oriented(module, ~keep), sparsity, group)


def test_magnitude_keeps_the_largest_weights():
    model = _model("llama")
    dense = {n: m.weight.detach().clone() for n, m in find_prunable_modules(model).items()}
    masks = magnitude(model, 0.6)
    for name, weight in dense.items():
        assert torch.equal(masks[name], keep_mask(weight.abs(), 0.6))
        kept, dropped = weight[masks[name]].abs(), weight[~masks[name]].abs()
        assert kept.min() >= dropped.max()


# --------------------------------------------------------------------------------------------------
# the math on a single Linear: reconstruction error ||W X - W' X||


def _correlated_inputs(n: int, dim: int, seed: int, decades: float) -> torch.Tensor:
    """AR(1)-correlated features (neighbours correlate 0.9), column scales spread over ``decades`` powers of 10."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(dim, dtype=torch.float64)
    covariance = 0.9 ** (index[:, None] - index[None, :]).abs()
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(covariance).T
    scales = torch.logspace(-decades / 2, decades / 2, dim, dtype=torch.float64)[torch.randperm(dim, generator=gen)]
    return (x * scales).float()


def _errors(weight: torch.Tensor, x: torch.Tensor, sparsity: float, sparsity_type: str) -> dict[str, float]:
    def error(new_weight):
        return float(torch.linalg.norm(x @ weight.T - x @ new_weight.T))

    magnitude_weight = weight * keep_mask(weight.abs(), sparsity, sparsity_type)
    wanda_type = "row" if sparsity_type == "unstructured" else sparsity_type
    wanda_weight = weight * keep_mask(wanda_score(weight, x.norm(dim=0)), sparsity, wanda_type)
    hessian = 2 * x.T @ x / x.shape[0]
    sparsegpt_weight, keep = sparsegpt_prune_weight(weight, hessian, sparsity, sparsity_type, blocksize=32)
    assert torch.equal(sparsegpt_weight == 0, ~keep)
    return {"magnitude": error(magnitude_weight), "wanda": error(wanda_weight), "sparsegpt": error(sparsegpt_weight)}


@pytest.mark.parametrize("sparsity_type, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
@pytest.mark.parametrize("decades", [0.0, 2.0])
def test_sparsegpt_reconstructs_best_on_a_single_linear(sparsity_type, sparsity, decades):
    # (with a 1000x spread of input scales, percdamp=0.01 of the mean diagonal over-damps the small
    # features and Wanda can win at 50% on one layer; 100x, typical of LLM outlier features, is fine)
    torch.manual_seed(0)
    layer = nn.Linear(96, 48)
    x = _correlated_inputs(1024, 96, seed=1, decades=decades)
    errors = _errors(layer.weight.detach(), x, sparsity, sparsity_type)
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]


@pytest.mark.parametrize("sparsity_type, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_wanda_beats_magnitude_when_input_scales_differ(sparsity_type, sparsity):
    torch.manual_seed(0)
    layer = nn.Linear(96, 48)
    x = _correlated_inputs(1024, 96, seed=1, decades=2.0)
    errors = _errors(layer.weight.detach(), x, sparsity, sparsity_type)
    assert errors["wanda"] < 0.8 * errors["magnitude"]


def test_sparsegpt_lazy_batch_updates_do_not_change_the_result():
    """Column j sees the updates of every earlier column whatever the block size (N:M masks are chosen per column)."""
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    x = _correlated_inputs(512, 64, seed=2, decades=1.0)
    hessian = 2 * x.T @ x / x.shape[0]
    small, keep_small = sparsegpt_prune_weight(weight, hessian, sparsity_type="2:4", blocksize=4)
    large, keep_large = sparsegpt_prune_weight(weight, hessian, sparsity_type="2:4", blocksize=64)
    assert torch.equal(keep_small, keep_large)
    assert torch.allclose(small, large, atol=1e-5)


def test_sparsegpt_prune_weight_exact_counts_odd_shapes_and_dead_inputs():
    torch.manual_seed(0)
    weight = torch.randn(37, 200)
    x = torch.randn(300, 200)
    x[:, [3, 150]] = 0.0  # inputs that never fire
    hessian = 2 * x.T @ x / x.shape[0]
    for sparsity_type, sparsity in [("unstructured", 0.7), ("unstructured", 0.33), ("row", 0.9), ("4:8", 0.0)]:
        new_weight, keep = sparsegpt_prune_weight(weight, hessian, sparsity, sparsity_type, blocksize=64)
        _assert_pattern(~keep, sparsity, sparsity_type)
        assert (new_weight[~keep] == 0).all()
        assert not keep[:, [3, 150]].any() or sparsity_type == "4:8"  # dead inputs have saliency 0: pruned first
    # sparsity 0: nothing pruned, nothing changed; inputs never modified
    before = weight.clone()
    new_weight, keep = sparsegpt_prune_weight(weight, hessian + torch.eye(200), 0.0)
    assert keep.all() and torch.allclose(new_weight, weight) and torch.equal(weight, before)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune_weight(weight, hessian, 0.5, "4:8", blocksize=60)


# --------------------------------------------------------------------------------------------------
# Wanda's score, by hand and inside the sequential pipeline


def test_wanda_score_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    x = torch.tensor([[1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [4.0, 0.0, 2.0]])
    norms = InputNorms(3, torch.device("cpu"))
    norms.update(x[:2].reshape(1, 2, 3))  # statistics accumulate over batches and positions
    norms.update(x[2:])
    expected_norms = torch.tensor([5.0, 1.0, 3.0])  # sqrt(1+4+4+16), sqrt(1), sqrt(4+1+4)
    assert torch.allclose(norms.norms(), expected_norms)
    expected = torch.tensor([[5.0, 2.0, 9.0], [20.0, 5.0, 18.0]])
    assert torch.allclose(wanda_score(weight, norms.norms()), expected)
    # per output row, 1 of 3 pruned: the smallest score of each row
    assert torch.equal(keep_mask(expected, 1 / 3, "row"), torch.tensor([[True, False, True], [True, False, True]]))


def _input_norms(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``||X_j||`` of each module's inputs in a plain forward of ``model``, batch by batch."""
    stats = {name: InputNorms(_in_features(module), torch.device("cpu")) for name, module in modules.items()}
    handles = [
        module.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.update(args[0]))
        for name, module in modules.items()
    ]
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {name: stat.norms() for name, stat in stats.items()}


def test_wanda_masks_follow_the_score_sequentially():
    model = _model("llama")
    ids = _calibration()
    dense = {n: m.weight.detach().clone() for n, m in find_prunable_modules(model).items()}
    layer0 = [n for n in dense if ".layers.0." in n]
    layer1_inputs = [n for n in dense if ".layers.1." in n and n.endswith(("q_proj", "k_proj", "v_proj"))]
    dense_norms = _input_norms(model, find_prunable_modules(model, layer0), ids)

    masks = wanda(model, ids, 0.5, batch_size=4, progress=False)
    # layer 0 sees the dense model's inputs
    for name in layer0:
        assert torch.equal(masks[name], keep_mask(wanda_score(dense[name], dense_norms[name]), 0.5, "row")), name
    # layer 1 sees what the *pruned* layer 0 produces (q/k/v inputs do not depend on layer 1's own pruning)
    pruned_norms = _input_norms(model, find_prunable_modules(model, layer1_inputs), ids)
    for name in layer1_inputs:
        assert torch.equal(masks[name], keep_mask(wanda_score(dense[name], pruned_norms[name]), 0.5, "row")), name


# --------------------------------------------------------------------------------------------------
# the sequential driver on every architecture


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_layerwise_inputs_match_the_dense_forward(arch):
    """With nothing pruned, every module sees exactly the inputs of a plain forward pass."""
    model = _model(arch)
    ids = _calibration(seqlen=12)
    modules = find_prunable_modules(model)
    expected = _input_norms(model, modules, ids)
    seen = {}

    def make_statistic(module):
        return InputNorms(_in_features(module), torch.device("cpu"))

    def keep_all(name, module, stat):
        seen[name] = stat.norms()
        return torch.ones_like(module.weight, dtype=torch.bool)

    prune_layerwise(model, ids, modules, make_statistic, keep_all, batch_size=4, progress=False)
    assert set(seen) == set(modules)
    for name in modules:
        assert torch.allclose(seen[name], expected[name], rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("method", list(PRUNERS))
def test_every_architecture_prunes_and_still_runs(method, arch):
    model = _model(arch)
    model.train()  # the pruners switch to eval and must restore this
    use_cache = model.config.use_cache
    masks = _run(method, model, 0.5, "unstructured")
    assert model.training and model.config.use_cache == use_cache
    modules = find_prunable_modules(model)
    assert set(masks) == set(modules)
    if arch == "opt_projected":  # modules outside the decoder layers are pruned too
        assert {"model.decoder.project_in", "model.decoder.project_out"} <= set(masks)
    for name, module in modules.items():
        assert torch.equal(module.weight == 0, ~masks[name]), name
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_calibration(2, 16, seed=5)).logits
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()
    assert not any(p.grad is not None for p in model.parameters())


def test_calibration_from_a_dataset_and_module_selection():
    ids = _calibration()
    dataset = token_blocks(ids.reshape(-1), block_size=16)
    assert torch.equal(as_token_ids(dataset), ids)
    model = _model("llama")
    masks = sparsegpt(model, dataset, 0.5, "2:4", target_modules=["q_proj", "down_proj"], batch_size=4, progress=False)
    assert sorted(masks) == sorted(n for n in find_prunable_modules(model) if n.endswith(("q_proj", "down_proj")))
    assert model.model.layers[0].self_attn.k_proj.weight.ne(0).all()  # untouched
    assert find_decoder_layers(model) is model.model.layers
    with pytest.raises(ValueError, match="input_ids"):
        wanda(model, dataset.remove_columns("input_ids"), progress=False)
    with pytest.raises(ValueError, match="token ids"):
        wanda(model, torch.randn(2, 8), progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        magnitude(model, 1.0)
