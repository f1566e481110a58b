"""Projections against a brute-force reference.

Reference rule: inside each comparison group, sort the entries by (score, index) ascending and prune the
first k: the largest scores are kept and, among equal scores, the LOWER index is pruned first.
k = round(group_size * s) for "unstructured" (group = tensor) and "row" (group = output row),
k = M - N for "N:M" (group = M consecutive inputs of a row).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ref_keep_mask

from hf_elsa import keep_mask, project
from hf_elsa.projection import importance_score, zero_pruned_

PATTERNS = ("unstructured", "row", "2:4", "4:8", "1:4")


def expected_zeros_per_group(shape, sparsity, sparsity_type):
    if sparsity_type == "unstructured":
        return [round(torch.Size(shape).numel() * sparsity)]
    if sparsity_type == "row":
        return [round(shape[1] * sparsity)] * shape[0]
    n, m = (int(x) for x in sparsity_type.split(":"))
    return [m - n] * (shape[0] * shape[1] // m)


def groups_of(mask: torch.Tensor, sparsity_type: str) -> torch.Tensor:
    """(groups, group_size) view of a 2-D mask."""
    if sparsity_type == "unstructured":
        return mask.reshape(1, -1)
    if sparsity_type == "row":
        return mask
    m = int(sparsity_type.split(":")[1])
    return mask.reshape(-1, m)


def _score_cases():
    """(name, tensor) pairs: continuous, heavy ties, all equal, ties at the threshold, negatives."""
    gen = torch.Generator().manual_seed(0)
    yield "random", torch.randn(6, 16, generator=gen)
    yield "few_values", torch.randint(0, 3, (6, 16), generator=gen).float()
    yield "all_equal", torch.full((4, 8), 0.5)
    yield "all_zero", torch.zeros(3, 8)
    yield "ties_binary", torch.randint(0, 2, (5, 24), generator=gen).float()
    yield "rounded", torch.randn(3, 8, generator=gen).round(decimals=0)


CASES = list(_score_cases())


@pytest.mark.parametrize("sparsity_type", PATTERNS)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_keep_mask_matches_bruteforce(case, sparsity, sparsity_type):
    _, score = case
    mask = keep_mask(score.clone(), sparsity, sparsity_type)
    assert mask.dtype == torch.bool
    assert mask.shape == score.shape
    ref = ref_keep_mask(score, sparsity, sparsity_type)
    assert torch.equal(mask, ref), f"mismatch at {(mask != ref).nonzero().tolist()[:8]}"


@pytest.mark.parametrize("sparsity_type", PATTERNS)
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.8, 0.95])
def test_exact_zero_count_per_group(sparsity, sparsity_type):
    gen = torch.Generator().manual_seed(1)
    score = torch.randn(10, 40, generator=gen).abs()
    mask = keep_mask(score, sparsity, sparsity_type)
    zeros = (~groups_of(mask, sparsity_type)).sum(dim=1).tolist()
    assert zeros == expected_zeros_per_group(score.shape, sparsity, sparsity_type)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 1), (13, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.7, 0.999])
def test_unstructured_any_shape(shape, sparsity):
    gen = torch.Generator().manual_seed(2)
    score = torch.randn(shape, generator=gen)
    mask = keep_mask(score, sparsity, "unstructured")
    n = torch.Size(shape).numel()
    assert int((~mask).sum()) == round(n * sparsity)
    assert torch.equal(mask, ref_keep_mask(score, sparsity, "unstructured"))


def test_tie_break_lower_index_pruned_first():
    score = torch.ones(1, 8)
    assert keep_mask(score, 0.5, "unstructured").tolist() == [[False] * 4 + [True] * 4]
    assert keep_mask(score, 0.25, "row").tolist() == [[False] * 2 + [True] * 6]
    assert keep_mask(score, 0.0, "2:4").tolist() == [[False, False, True, True] * 2]
    # per group: the second row starts its own tie order
    two_rows = torch.ones(2, 4)
    assert keep_mask(two_rows, 0.5, "row").tolist() == [[False, False, True, True]] * 2
    # tie only at the threshold: the smallest is pruned, then the lower-index of the tied pair
    assert keep_mask(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), 0.5, "unstructured").tolist() == [[True, False, True, False]]


def test_sparsity_zero_prunes_nothing():
    score = torch.randn(4, 8)
    for kind in ("unstructured", "row"):
        assert bool(keep_mask(score, 0.0, kind).all())
    values = torch.randn(4, 8)
    projected, mask = project(values, 0.0)
    assert torch.equal(projected, values) and bool(mask.all())


def test_keep_mask_does_not_modify_input():
    score = torch.randn(4, 8)
    before = score.clone()
    keep_mask(score, 0.5, "2:4")
    project(score, 0.5)
    assert torch.equal(score, before)


@pytest.mark.parametrize("sparsity_type", PATTERNS)
def test_project_magnitude_keeps_largest_abs(sparsity_type):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 16, generator=gen)
    projected, mask = project(values, 0.6, sparsity_type)
    ref = ref_keep_mask(values.abs(), 0.6, sparsity_type)
    assert torch.equal(mask, ref)
    assert torch.equal(projected, torch.where(ref, values, torch.zeros_like(values)))


def test_project_magnitude_uses_absolute_value():
    values = torch.tensor([[-5.0, 0.1, 4.0, -0.2]])
    projected, mask = project(values, 0.5)
    assert mask.tolist() == [[True, False, True, False]]
    assert projected.tolist() == [[-5.0, 0.0, 4.0, 0.0]]


# ---------------------------------------------------------------------------------------------------
# curvature-weighted projection: score = (h + delta)^alpha * v^2
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_zero", [1, 3, 5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curvature_projection_is_weighted_argmin(seed, k_zero):
    """For alpha = 1 the projection minimises sum_i h_i (z_i - v_i)^2 over z with k_zero zeros."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(8, generator=gen, dtype=torch.float64).float()
    h = torch.rand(8, generator=gen, dtype=torch.float64).float() * 10 + 0.01
    sparsity = k_zero / 8
    best, best_z = None, None
    for zeros in itertools.combinations(range(8), k_zero):
        z = v.clone()
        z[list(zeros)] = 0
        obj = float((h.double() * (z.double() - v.double()) ** 2).sum())
        if best is None or obj < best:
            best, best_z = obj, z
    projected, mask = project(v, sparsity, curvature=h, alpha=1.0)
    assert int((~mask).sum()) == k_zero
    assert torch.equal(projected, best_z)
    # the magnitude projection is generally a different (worse) answer: the test can tell them apart
    obj = float((h.double() * (projected.double() - v.double()) ** 2).sum())
    assert obj == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_curvature_changes_the_selection():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    h = torch.tensor([100.0, 1.0, 1.0, 1.0])
    _, mask = project(v, 0.5, curvature=h, alpha=1.0)
    # scores h v^2: 100, 4, 9, 16 -> keep entries 0 and 3
    assert mask.tolist() == [True, False, False, True]
    _, mag = project(v, 0.5)
    assert mag.tolist() == [False, False, True, True]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_importance_score_formula(alpha):
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(3, 8, generator=gen)
    h = torch.rand(3, 8, generator=gen)
    delta = 1e-3
    score = importance_score(v, h, alpha=alpha, delta=delta)
    expected = (h.double() + delta) ** alpha * v.double() ** 2
    if alpha == 0:
        # alpha = 0 is magnitude: same ranking as v^2
        assert torch.equal(keep_mask(score, 0.5), keep_mask(v.abs(), 0.5))
    else:
        torch.testing.assert_close(score.double(), expected, rtol=1e-5, atol=1e-12)
    mask = project(v, 0.5, curvature=h, alpha=alpha)[1] if alpha else None
    if mask is not None:
        assert torch.equal(mask, ref_keep_mask((h.double() + 1e-12) ** alpha * v.double() ** 2, 0.5, "unstructured"))


def test_importance_score_without_curvature_is_magnitude():
    v = torch.tensor([[-3.0, 1.0, -0.5, 2.0]])
    assert importance_score(v).tolist() == [[3.0, 1.0, 0.5, 2.0]]


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["3:2", "a:b", "2:", ":4", "2-4", "", "columns", "2:0", "2:x"])
def test_malformed_nm_raises(bad):
    with pytest.raises(ValueError, match="sparsity_type"):
        keep_mask(torch.randn(4, 8), 0.5, bad)


@pytest.mark.parametrize("sparsity_type,in_features", [("2:4", 6), ("4:8", 12), ("1:4", 10)])
def test_nm_needs_divisible_in_features(sparsity_type, in_features):
    with pytest.raises(ValueError, match="divisible"):
        keep_mask(torch.randn(4, in_features), 0.5, sparsity_type)


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, -1e-9])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "row"])
def test_sparsity_out_of_range_raises(sparsity, sparsity_type):
    with pytest.raises(ValueError, match="sparsity"):
        keep_mask(torch.randn(4, 8), sparsity, sparsity_type)
    with pytest.raises(ValueError, match="sparsity"):
        project(torch.randn(4, 8), sparsity, sparsity_type)


def test_above_quantile_limit_is_exact():
    """torch.quantile fails above 16M elements; the selection must not."""
    gen = torch.Generator().manual_seed(5)
    n = 2**24 + 8
    score = torch.randint(0, 1000, (n,), generator=gen).float()  # heavy ties at the threshold
    mask = keep_mask(score, 0.7)
    assert int((~mask).sum()) == round(n * 0.7)
    # everything pruned scores <= everything kept
    assert float(score[~mask].max()) <= float(score[mask].min())
    # ties at the threshold: the lower indices are pruned first
    threshold = float(score[~mask].max())
    tied = (score == threshold).nonzero().squeeze(1)
    pruned_tied = tied[~mask[tied]]
    kept_tied = tied[mask[tied]]
    if kept_tied.numel() and pruned_tied.numel():
        assert int(pruned_tied.max()) < int(kept_tied.min())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "row", "2:4"])
def test_other_dtypes(dtype, sparsity_type):
    gen = torch.Generator().manual_seed(6)
    score = torch.randn(6, 16, generator=gen).to(dtype)  # bf16/fp16 rounding creates ties
    mask = keep_mask(score, 0.5, sparsity_type)
    assert torch.equal(mask, ref_keep_mask(score.double(), 0.5, sparsity_type))
    values = score.clone()
    projected, mask = project(values, 0.5, sparsity_type)
    assert projected.dtype == dtype
    assert torch.equal(projected, values * ref_keep_mask(values.double().abs(), 0.5, sparsity_type))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zero_pruned_is_bit_exact_masked_fill(dtype):
    """Pruned entries become +0.0 whatever they held (NaN, inf, -0.0), kept ones keep their bits, in place."""
    values = torch.randn(6, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    values[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
    values[1, :2] = torch.tensor([float("nan"), -0.0], dtype=dtype)
    keep = torch.rand(6, 10, generator=torch.Generator().manual_seed(3)) > 0.5
    keep[0, :4], keep[1, :2] = False, True
    expected = values.masked_fill(~keep, 0)
    out = values.t()  # a non-contiguous view is zeroed in place too
    assert zero_pruned_(out, keep.t()) is out
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))  # the same bits, NaN included
