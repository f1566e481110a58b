"""selection.prune_smallest against selection.prune_smallest_direct and the brute-force (score, index) sort.

The sampled path only runs on rows longer than ``selection.SAMPLE``; the tests shrink SAMPLE so that tiny
tensors take it, and shrink the margin to force bracket misses (the exact fallback).
"""

from __future__ import annotations

import pytest
import torch
from conftest import _prune_group

from hf_elsa import selection
from hf_elsa.selection import prune_smallest, prune_smallest_direct
from hf_elsa.selection import prune_smallest_direct as _prune_smallest


def _old(score, k):
    # NaN becomes -inf and ties with a real -inf (nan_to_num's defaults would turn +-inf into finite values)
    inf = float("inf")
    return _prune_smallest(torch.nan_to_num(score, nan=-inf, posinf=inf, neginf=-inf), k)


def _brute(score, k):
    inf = float("inf")
    rows = torch.nan_to_num(score.double(), nan=-inf, posinf=inf, neginf=-inf).tolist()
    return ~torch.tensor([_prune_group(row, k) for row in rows], dtype=torch.bool).reshape(score.shape)


def _cases(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    yield "random", x
    yield "few_values", torch.randint(0, 4, (rows, cols), generator=gen).float()
    yield "all_equal", torch.full((rows, cols), 0.5)
    yield "rounded", x.round(decimals=1)
    special = x.clone()
    special[torch.rand(rows, cols, generator=gen) < 0.1] = float("nan")
    special[torch.rand(rows, cols, generator=gen) < 0.15] = 0.0
    special[torch.rand(rows, cols, generator=gen) < 0.15] = -0.0
    special[torch.rand(rows, cols, generator=gen) < 0.05] = float("inf")
    special[torch.rand(rows, cols, generator=gen) < 0.05] = -float("inf")
    yield "nan_zeros_inf", special
    yield "all_nan", torch.full((rows, cols), float("nan"))
    # no NaN, so several rows take numpy's introselect path: infinities, zeros of both signs and ties
    infinite = x.round(decimals=1)
    infinite[torch.rand(rows, cols, generator=gen) < 0.1] = float("inf")
    infinite[torch.rand(rows, cols, generator=gen) < 0.1] = -0.0
    yield "inf_no_nan", infinite
    yield "signed_zeros", torch.where(torch.rand(rows, cols, generator=gen) < 0.5, 0.0, -0.0)


SHAPES = [(1, 7), (1, 96), (1, 400), (3, 40), (5, 129)]


@pytest.mark.parametrize("sample", [16, 10**9])  # sampled path / direct path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_old_and_bruteforce(monkeypatch, shape, dtype, sample):
    monkeypatch.setattr(selection, "SAMPLE", sample)
    rows, cols = shape
    for name, score in _cases(rows, cols, seed=rows * 1000 + cols):
        score = score.to(dtype)
        for k in sorted({0, 1, cols // 3, cols // 2, round(cols * 0.9), cols - 1, cols}):
            got = prune_smallest(score, k)
            assert got.dtype == torch.bool and got.shape == score.shape
            assert torch.equal(got, _old(score, k)), (name, k)
            assert torch.equal(got, _brute(score, k)), (name, k)
            assert (got.sum(dim=1) == k).all()


def test_bracket_misses_fall_back_exactly(monkeypatch):
    """A zero margin makes the sampled bracket miss often; the result must stay exact."""
    monkeypatch.setattr(selection, "SAMPLE", 8)
    monkeypatch.setattr(selection, "MARGIN_SD", 0.0)
    gen = torch.Generator().manual_seed(3)
    for trial in range(50):
        score = torch.randn(1, 300, generator=gen).round(decimals=trial % 3)
        k = int(torch.randint(0, 301, (1,), generator=gen))
        assert torch.equal(prune_smallest(score, k), _old(score, k))


def test_large_flat_tensor_default_sample():
    """The default sample size on a tensor long enough to take the sampled path."""
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(1, 50_000, generator=gen).abs()
    score[0, ::7] = score[0, 3]  # a large tie group
    for k in (1, 7_000, 25_000, 45_000, 49_999):
        assert torch.equal(prune_smallest(score, k), _old(score, k))


def test_integer_scores_and_deterministic():
    score = torch.randint(0, 5, (4, 33), generator=torch.Generator().manual_seed(1))
    assert torch.equal(prune_smallest(score, 10), _old(score.float(), 10))
    assert torch.equal(prune_smallest(score, 10), prune_smallest(score, 10))
    assert torch.equal(prune_smallest_direct(score.float(), 10), _old(score.float(), 10))


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        prune_smallest(torch.zeros(3), 1)


@pytest.mark.parametrize("n", [8, 1000, 1024, 4096, 100_000, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_flat_nonzero(n, density):
    from hf_elsa.selection import _count, _flat_nonzero

    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    expected = flags.nonzero().view(-1)
    assert torch.equal(_flat_nonzero(flags), expected)
    assert _count(flags) == expected.numel()
    if n > 16:
        view = flags[8:]  # a view at an offset of one word
        assert torch.equal(_flat_nonzero(view), view.nonzero().view(-1))
