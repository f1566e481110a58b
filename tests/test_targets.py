"""hf_elsa.targets: which weights are prunable (shared by the trainer, the one-shot pruners, memory and I/O)."""

import pytest
from conftest import make_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_elsa.targets import PRUNABLE_TYPES, find_prunable_modules, is_transposed


def _suffixes(modules) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in modules}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_default_targets_are_every_linear_but_the_lm_head(arch):
    model = make_model(arch)
    modules = find_prunable_modules(model)
    head = model.get_output_embeddings()
    expected = {n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and m is not head}
    assert set(modules) == expected and expected
    assert all(m is not head for m in modules.values())


def test_suffixes_select_and_exclude():
    model = make_model("llama")
    modules = find_prunable_modules(model, target_modules=["q_proj", "v_proj"])
    assert _suffixes(modules) == {"q_proj", "v_proj"} and len(modules) == 4  # 2 layers
    modules = find_prunable_modules(model, exclude_modules=["down_proj"])
    assert "down_proj" not in _suffixes(modules) and "up_proj" in _suffixes(modules)


def test_a_suffix_matches_whole_name_parts_only():
    model = make_model("llama")
    # "proj" is not a dotted suffix of "q_proj": it matches nothing (and says what the names end in)
    with pytest.raises(ValueError, match=r"target_modules=\['proj'\] matches no Linear layer.*q_proj"):
        find_prunable_modules(model, target_modules=["proj"])


def test_one_regex_matches_the_full_name():
    model = make_model("llama")
    modules = find_prunable_modules(model, target_modules=[r"model\.layers\.0\..*_proj"])
    assert modules and all(name.startswith("model.layers.0.") for name in modules)
    # an invalid regex is only a name, never an error
    assert (
        find_prunable_modules(model, target_modules=["q_proj", "(["]).keys()
        == find_prunable_modules(model, target_modules=["q_proj"]).keys()
    )


def test_excluding_everything_says_nothing_is_left():
    with pytest.raises(ValueError, match="nothing to prune"):
        find_prunable_modules(make_model("llama"), exclude_modules=[".*"])


def test_a_shape_the_pattern_cannot_take_names_the_module():
    model = nn.Sequential(nn.Linear(6, 4))  # in_features 6: not a multiple of M = 4
    with pytest.raises(ValueError, match=r"0\.weight: sparsity_type='2:4' needs in_features divisible by M=4"):
        find_prunable_modules(model, sparsity_type="2:4")
    assert list(find_prunable_modules(model, sparsity_type="unstructured")) == ["0"]


def test_conv1d_is_transposed_and_checked_in_its_linear_orientation():
    conv = Conv1D(nf=4, nx=8)  # weight (in=8, out=4)
    assert is_transposed(conv) and not is_transposed(nn.Linear(8, 4))
    model = nn.Sequential(conv)
    assert list(find_prunable_modules(model, sparsity_type="2:4")) == ["0"]  # in_features 8 divides by 4
    bad = nn.Sequential(Conv1D(nf=8, nx=6))  # in_features 6
    with pytest.raises(ValueError, match="in_features divisible"):
        find_prunable_modules(bad, sparsity_type="2:4")


def test_a_model_without_output_embeddings_prunes_every_linear():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(find_prunable_modules(model)) == ["0", "2"]
