"""Non-uniform sparsity allocation against brute force and hand computations (hf_elsa.allocation)."""

from __future__ import annotations

import pytest
import torch

from hf_elsa.allocation import GlobalBudget, Owl, bounded_counts, layer_of, outlier_ratios, owl_layer_sparsities


def _scores(seed=0, shapes=((4, 8), (6, 5), (3, 16))):
    gen = torch.Generator().manual_seed(seed)
    # different scales per tensor: a global threshold on raw scores would empty the small-scale tensor
    return {f"t{i}": torch.rand(shape, generator=gen) * 10.0**i for i, shape in enumerate(shapes)}


def _brute_force_global(scores, sparsity):
    """Sort (normalised score, tensor name, flat index) ascending and prune the first round(N * s)."""
    entries = []
    for name in sorted(scores):
        s = scores[name].double().flatten()
        normalised = s / s.mean()
        entries += [(float(v), name, i) for i, v in enumerate(normalised)]
    entries.sort()
    k = round(len(entries) * sparsity)
    counts = {name: 0 for name in scores}
    for _, name, _ in entries[:k]:
        counts[name] += 1
    return counts


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_equals_brute_force_without_binding_bounds(sparsity, seed):
    scores = _scores(seed)
    numels = {n: s.numel() for n, s in scores.items()}
    got = GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, sparsity)
    expected = _brute_force_global(scores, sparsity)
    assert {n: round(got[n] * numels[n]) for n in got} == expected
    assert sum(round(got[n] * numels[n]) for n in got) == round(sum(numels.values()) * sparsity)


def test_global_normalises_scale_away():
    """Two tensors with the same values up to a factor 1000 get the same sparsity."""
    base = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    scores = {"small": base, "large": base * 1000}
    numels = {n: 64 for n in scores}
    got = GlobalBudget().tensor_sparsities(scores, numels, 0.5)
    assert got["small"] == got["large"] == 0.5


@pytest.mark.parametrize("sparsity,low,high", [(0.7, 0.66, 0.74), (0.5, 0.45, 0.55), (0.9, 0.85, 0.95)])
def test_global_respects_floors_and_caps_and_keeps_the_total(sparsity, low, high):
    gen = torch.Generator().manual_seed(5)
    # one tensor of tiny outliers-free scores and one very peaked: unbounded global would push them apart
    scores = {"flat": torch.rand(20, 20, generator=gen) + 1.0, "peaked": torch.rand(20, 20, generator=gen) ** 8}
    numels = {n: 400 for n in scores}
    free = GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, sparsity)
    assert any(not low <= v <= high for v in free.values()), "the bounds must bind for this test to mean anything"
    got = GlobalBudget(low, high).tensor_sparsities(scores, numels, sparsity)
    counts = {n: round(got[n] * numels[n]) for n in got}
    assert sum(counts.values()) == round(800 * sparsity)
    assert all(low - 1e-9 <= got[n] <= high + 1e-9 for n in got)


def test_global_threshold_rule_holds_among_unbounded_tensors():
    scores = _scores(7, shapes=((10, 10), (10, 10), (10, 10), (5, 5)))
    numels = {n: s.numel() for n, s in scores.items()}
    got = GlobalBudget(0.55, 0.85).tensor_sparsities(scores, numels, 0.7)
    free = [n for n in got if 0.55 + 1e-9 < got[n] < 0.85 - 1e-9]
    pruned_max, kept_min = -1.0, float("inf")
    for n in free:
        s = scores[n].flatten().double()
        normalised, _ = torch.sort(s / s.mean())
        k = round(got[n] * numels[n])
        pruned_max = max(pruned_max, float(normalised[k - 1]) if k else -1.0)
        kept_min = min(kept_min, float(normalised[k]) if k < len(normalised) else float("inf"))
    assert pruned_max <= kept_min


def test_bounded_counts_fixes_the_rounding_total():
    wanted = {"a": 0.5, "b": 0.5, "c": 0.5}
    numels = {"a": 3, "b": 3, "c": 3}  # 1.5 each rounds to 2 (banker's: 2) -> 6, but the total is round(4.5) = 4
    counts = bounded_counts(wanted, numels, 4, 0.0, 1.0)
    assert sum(counts.values()) == 4 and all(1 <= c <= 2 for c in counts.values())


def test_layer_of_reads_decoder_layer_indices():
    assert layer_of("model.layers.3.mlp.up_proj") == "3"
    assert layer_of("transformer.h.11.attn.c_attn") == "11"
    assert layer_of("model.decoder.layers.0.fc1") == "0"
    assert layer_of("lm_adapter") == "lm_adapter"


def test_owl_ratios_and_sparsities_against_a_hand_computation():
    # layer 0: Wanda scores 1,1,1,1,1,1,1,25 -> mean 4, threshold 2 * 4 = 8 -> 1 outlier of 8
    # layer 1: all equal -> no outlier
    scores = {
        "model.layers.0.q": torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 625.0]]),
        "model.layers.1.q": torch.full((2, 4), 4.0),
    }
    numels = {n: 8 for n in scores}
    ratios = outlier_ratios(scores, numels, threshold=2.0)
    assert ratios == {"0": pytest.approx(1 / 8), "1": 0.0}
    layer = owl_layer_sparsities(ratios, {"0": 8, "1": 8}, sparsity=0.5, spread=0.1)
    # raw 1 - D: 0.875, 1.0 -> linear onto [0.4, 0.6]: 0.4, 0.6 -> mean 0.5 already
    assert layer == {"0": pytest.approx(0.4), "1": pytest.approx(0.6)}
    got = Owl(0.0, 1.0, outlier_threshold=2.0, spread=0.1).tensor_sparsities(scores, numels, 0.5)
    counts = {n: round(got[n] * 8) for n in got}
    assert sum(counts.values()) == 8 and counts["model.layers.0.q"] < counts["model.layers.1.q"]


def test_owl_mean_is_the_target_with_unequal_layers():
    ratios = {"0": 0.02, "1": 0.05, "2": 0.01}
    sizes = {"0": 100, "1": 300, "2": 50}
    layer = owl_layer_sparsities(ratios, sizes, 0.7, 0.08)
    assert sum(layer[k] * sizes[k] for k in sizes) / 450 == pytest.approx(0.7)
    assert max(layer.values()) - min(layer.values()) == pytest.approx(0.16)
    assert layer["1"] == min(layer.values())  # the most outliers -> the least sparsity


@pytest.mark.parametrize("sample,margin", [(65536, 5.0), (16, 0.0), (8, -4.0)])  # default / tight / always missing
def test_global_search_is_exact_whatever_the_sampled_bracket(monkeypatch, sample, margin):
    from hf_elsa.allocation import global_budget

    monkeypatch.setattr(global_budget, "SAMPLE", sample)
    monkeypatch.setattr(global_budget, "MARGIN_SD", margin)
    ranges = []
    bisect = global_budget._bisect
    monkeypatch.setattr(
        global_budget, "_bisect", lambda b, k, r, lo, hi: ranges.append((lo, hi)) or bisect(b, k, r, lo, hi)
    )
    for seed in range(4):
        scores = _scores(seed, shapes=((40, 30), (25, 20), (30, 64)))
        scores["t0"][:5] = 0.5  # ties across the threshold
        numels = {n: s.numel() for n, s in scores.items()}
        for sparsity in (0.3, 0.7, 0.95):
            got = GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, sparsity)
            assert {n: round(got[n] * numels[n]) for n in got} == _brute_force_global(scores, sparsity)
    full = global_budget._FULL_RANGE
    if margin == 5.0:
        assert full not in ranges  # the default bracket holds: the bisection only ran over its band
    if margin < 0:
        assert ranges and all(r == full for r in ranges)  # an empty bracket: every search over all entries


def test_global_allocation_over_shards_equals_the_whole(monkeypatch):
    """Two 'processes' (threads) holding halves of every tensor, counts summed by a barrier all-reduce."""
    import threading

    scores = _scores(3, shapes=((40, 30), (24, 20), (30, 64)))
    numels = {n: s.numel() for n, s in scores.items()}
    whole = GlobalBudget(0.6, 0.8).tensor_sparsities(scores, numels, 0.7)
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def make_reduce(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    def process(rank):
        shards = {n: s.chunk(2)[rank] for n, s in scores.items()}  # as FSDP2 shards rows
        results[rank] = GlobalBudget(0.6, 0.8).tensor_sparsities(shards, numels, 0.7, reduce=make_reduce(rank))

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == whole


def _tricky_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = _scores(seed, shapes=((40, 30), (25, 20), (30, 64)))
    scores["t0"] = scores["t0"].round(decimals=1)  # many exact ties, also at the threshold
    scores["t1"][:3] = 0.0
    scores["t1"][3] = -0.0
    scores["t1"][4, :5] = -1.0  # negative scores count as zero
    scores["t2"] = scores["t2"] * 3.0 ** torch.randint(-3, 4, scores["t2"].shape, generator=gen)  # wide range
    return scores


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_raw_comparisons_equal_the_fully_normalised_path(sparsity, seed, monkeypatch):
    """Only entries near the bracket are normalised; the counts equal those of normalising everything."""
    from hf_elsa.allocation import global_budget

    scores = _tricky_scores(seed)
    numels = {n: s.numel() for n, s in scores.items()}
    made = []
    original = global_budget.NormalisedScores.__init__
    monkeypatch.setattr(global_budget.NormalisedScores, "__init__",
                        lambda self, *a: original(self, *a) or made.append(self))  # fmt: skip
    fast = GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, sparsity)
    assert made and all(m._bits is None for m in made)  # the raw comparisons decided: nothing fully normalised
    monkeypatch.setattr(global_budget.NormalisedScores, "__init__",
                        lambda self, *a: original(self, *a) or setattr(self, "raw_comparable", False))  # fmt: skip
    assert GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, sparsity) == fast


def test_global_with_nan_and_inf_scores_takes_the_full_pass():
    scores = _scores(4, shapes=((20, 20), (10, 30)))
    scores["t0"][0, :3] = float("nan")  # NaN counts as the least important
    scores["t1"][0, 0] = float("inf")
    numels = {n: s.numel() for n, s in scores.items()}
    got = GlobalBudget(0.0, 1.0).tensor_sparsities(scores, numels, 0.5)
    assert sum(round(got[n] * numels[n]) for n in got) == round(sum(numels.values()) * 0.5)
