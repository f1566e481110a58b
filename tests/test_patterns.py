"""Sparsity patterns: parsed once, each answers what it means (hf_elsa.patterns)."""

from __future__ import annotations

import pytest
import torch
from conftest import ref_keep_mask

from hf_elsa.patterns import NM, PATTERNS, Row, SparsityPattern, Unstructured, register_pattern, sparsity_pattern


@pytest.mark.parametrize(
    "text,cls,ramp,within_rows,allocation",
    [
        ("unstructured", Unstructured, True, False, True),
        ("row", Row, True, True, True),
        ("2:4", NM, False, True, False),
        ("4:8", NM, False, True, False),
    ],
)
def test_parse_and_properties(text, cls, ramp, within_rows, allocation):
    pattern = sparsity_pattern(text)
    assert isinstance(pattern, cls) and pattern.name == text and str(pattern) == text
    assert (pattern.can_ramp, pattern.groups_within_rows, pattern.allows_allocation) == (ramp, within_rows, allocation)
    assert sparsity_pattern(pattern) is pattern
    assert pattern == sparsity_pattern(text) and hash(pattern) == hash(sparsity_pattern(text))


@pytest.mark.parametrize("text", ["0:4", "4:4", "5:4", "2:0", "dense", "", "2:4:8", None, 3])
def test_bad_patterns_are_refused_with_the_allowed_values(text):
    with pytest.raises(ValueError, match="sparsity_type"):
        sparsity_pattern(text)


def test_sparsity_each_pattern_produces():
    assert sparsity_pattern("2:4").sparsity(0.9) == 0.5
    assert sparsity_pattern("1:4").sparsity(0.1) == 0.75
    assert sparsity_pattern("row").sparsity(0.3) == 0.3


def test_shape_checks_name_the_weight():
    with pytest.raises(ValueError, match="layer.weight.*divisible by M=4"):
        sparsity_pattern("2:4").check_shape((3, 6), "layer.weight")
    with pytest.raises(ValueError, match="2-D"):
        sparsity_pattern("row").check_shape((3, 4, 5))
    sparsity_pattern("unstructured").check_shape((3, 4, 5))


@pytest.mark.parametrize("text", ["unstructured", "row", "2:4", "1:4"])
def test_keep_mask_matches_the_reference(text):
    score = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sparsity_pattern(text).keep_mask(score, 0.6), ref_keep_mask(score, 0.6, text))


def _ref_nm_ramp(score, sparsity, n, m):
    """Brute force: per row, sort the entries the N:M mask prunes by (score, column) and prune the first
    round(in * sparsity) of them."""
    full_keep = ref_keep_mask(score, 0.0, f"{n}:{m}")
    keep = torch.ones_like(full_keep)
    for r in range(score.shape[0]):
        candidates = sorted((float(score[r, c]), c) for c in range(score.shape[1]) if not full_keep[r, c])
        for _, c in candidates[: round(score.shape[1] * sparsity)]:
            keep[r, c] = False
    return keep


@pytest.mark.parametrize("text,sparsity", [("2:4", 0.0), ("2:4", 0.2), ("2:4", 0.4), ("1:4", 0.6), ("4:8", 0.3)])
def test_nm_ramp_mask_prunes_the_lowest_nm_candidates_of_each_row(text, sparsity):
    score = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    pattern = sparsity_pattern(text)
    n, m = pattern.n, pattern.m
    keep = pattern.ramp_mask(score, sparsity)
    assert torch.equal(keep, _ref_nm_ramp(score, sparsity, n, m))
    assert ((~keep).sum(dim=1) == round(16 * sparsity)).all()
    assert (keep | pattern.keep_mask(score, 0.0)).equal(keep)  # a superset of the N:M mask: the ramp can end in it


@pytest.mark.parametrize("text", ["unstructured", "row", "2:4"])
def test_ramp_mask_at_the_pattern_sparsity_is_keep_mask(text):
    score = torch.randn(6, 16, generator=torch.Generator().manual_seed(6))
    pattern = sparsity_pattern(text)
    assert torch.equal(pattern.ramp_mask(score, pattern.sparsity(0.5)), pattern.keep_mask(score, 0.5))


def test_a_new_pattern_is_one_class_and_one_registration():
    class Blocks(SparsityPattern):
        """round(8 * s) zeros in every 8 consecutive inputs of a row (a pattern hf_elsa does not ship)."""

        @property
        def name(self):
            return "blocks8"

        @classmethod
        def parse(cls, text):
            return cls() if text == "blocks8" else None

        def groups(self, score):
            return score.reshape(-1, 8)

        def zeros(self, group_size, sparsity):
            return round(group_size * sparsity)

    register_pattern(Blocks)
    try:
        mask = sparsity_pattern("blocks8").keep_mask(torch.randn(3, 16), 0.5)
        assert (~mask).reshape(-1, 8).sum(dim=1).tolist() == [4] * 6
    finally:
        PATTERNS.unregister("blocks")
