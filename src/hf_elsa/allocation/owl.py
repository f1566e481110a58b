"""OWL (outlier-weighed layerwise sparsity): less sparsity for decoder layers with more outliers.

For each decoder layer l, ``D_l`` is the fraction of its weights whose score ``|W_ij| * ||X_j||`` exceeds
``outlier_threshold`` times the layer's mean score. Layer sparsities ``1 - D_l`` are rescaled linearly onto
``[sparsity - spread, sparsity + spread]`` and shifted so that the weighted mean is exactly ``sparsity``;
every tensor of the layer gets its layer's sparsity, within ``[min_sparsity, max_sparsity]``. Computed once,
from the first scores that carry activation statistics, then kept (the ramp scales it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .base import Reduce, SparsityAllocation, bounded_counts, no_reduce, register_allocation

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|decoder\.layers)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The decoder layer a module belongs to (``"model.layers.3.mlp.up_proj"`` -> ``"3"``), else the name itself."""
    match = _LAYER.search(name)
    return match.group(1) if match else name


def outlier_ratios(
    scores: Mapping[str, torch.Tensor], numels: Mapping[str, int], threshold: float, reduce: Reduce = no_reduce
) -> dict[str, float]:
    """``{layer: D_l}`` from projection scores ``(h + delta) * v^2`` (their square root is Wanda's score)."""
    layers = sorted({layer_of(n) for n in scores})
    members = {layer: [n for n in scores if layer_of(n) == layer] for layer in layers}
    wanda = {n: s.float().clamp_min(0).sqrt() for n, s in scores.items()}
    sums = reduce(torch.stack([sum(wanda[n].double().sum() for n in members[layer]) for layer in layers]))
    means = {layer: float(sums[i]) / sum(numels[n] for n in members[layer]) for i, layer in enumerate(layers)}
    above = reduce(
        torch.stack(
            [sum((wanda[n] > threshold * means[layer]).sum() for n in members[layer]).double() for layer in layers]
        )
    )
    return {layer: float(above[i]) / sum(numels[n] for n in members[layer]) for i, layer in enumerate(layers)}


def owl_layer_sparsities(ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, spread: float):
    """Layer sparsities from outlier ratios: linear onto ``sparsity +- spread``, weighted mean ``sparsity``."""
    raw = {layer: 1.0 - d for layer, d in ratios.items()}
    lo, hi = min(raw.values()), max(raw.values())
    if hi - lo <= 0:
        scaled = {layer: sparsity for layer in raw}
    else:
        scaled = {layer: sparsity - spread + 2 * spread * (r - lo) / (hi - lo) for layer, r in raw.items()}
    total = sum(sizes.values())
    shift = sparsity - sum(scaled[layer] * sizes[layer] for layer in scaled) / total
    return {layer: s + shift for layer, s in scaled.items()}


class Owl(SparsityAllocation):
    name = "owl"
    fixed_once_computed = True

    def __init__(self, min_sparsity=0.0, max_sparsity=1.0, outlier_threshold: float = 5.0, spread: float = 0.08):
        super().__init__(min_sparsity, max_sparsity)
        self.outlier_threshold = outlier_threshold
        self.spread = spread

    @classmethod
    def check_settings(cls, settings, owner: str) -> None:
        if settings.importance != "activation":
            raise ValueError(
                f"{owner}.sparsity_allocation='owl' ranks layers by their outlier activations, which "
                f"importance={settings.importance!r} does not collect: use importance='activation' (the default "
                "recipe's) or sparsity_allocation='global'."
            )

    @classmethod
    def from_settings(cls, settings) -> Owl:
        low, high = getattr(settings, "allocation_min_sparsity", 0.0), getattr(settings, "allocation_max_sparsity", 1.0)
        return cls(low, high, settings.owl_outlier_threshold, settings.owl_spread)

    def tensor_sparsities(
        self,
        scores: Mapping[str, torch.Tensor],
        numels: Mapping[str, int],
        sparsity: float,
        reduce: Reduce = no_reduce,
    ) -> dict[str, float]:
        ratios = outlier_ratios(scores, numels, self.outlier_threshold, reduce)
        sizes = {layer: sum(numels[n] for n in scores if layer_of(n) == layer) for layer in ratios}
        layer_sparsity = owl_layer_sparsities(ratios, sizes, sparsity, self.spread)
        wanted = {n: layer_sparsity[layer_of(n)] for n in scores}
        low, high = self.bounds(sparsity)
        counts = bounded_counts(wanted, numels, round(sum(numels.values()) * sparsity), low, high)
        return {n: counts[n] / numels[n] for n in counts}


register_allocation(Owl)
