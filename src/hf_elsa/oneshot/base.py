"""``OneShotPruner``: what magnitude, Wanda and SparseGPT share, and the registry of one-shot methods.

A pruner scores and prunes one module at a time. One without calibration (``requires_calibration = False``)
sees each weight alone; one with calibration first collects an input statistic per module (``make_statistic``)
while the decoder layers run one at a time on the calibration blocks (``hf_elsa.oneshot._sequential``), then
prunes each module from it. The base class owns everything else: argument checks, finding the prunable
modules, the sequential calibration and the masks it returns. Adding a method is a subclass and one
``register_pruner``; ``ElsaConfig(admm_init=...)``, ``hf-elsa prune --method ...`` and the benchmark then
accept its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..patterns import SparsityPattern
from ..registry import Registry
from ..targets import find_prunable_modules
from ._sequential import InputStatistic, prune_layerwise
from ._weights import check_arguments

# one-shot methods by name: ElsaConfig.admm_init, hf-elsa prune --method, the benchmark
PRUNERS: Registry[OneShotPruner] = Registry("admm_init")


class OneShotPruner:
    """Base class. Subclasses set ``name`` and ``requires_calibration`` and implement ``prune_module``
    (and ``make_statistic`` when they need calibration)."""

    #: the name users pass as ``ElsaConfig.admm_init`` / ``--method``
    name: ClassVar[str] = ""
    #: it needs calibration blocks (token ids): the decoder layers run on them to collect ``make_statistic``
    requires_calibration: ClassVar[bool] = False

    def check(self, pattern: SparsityPattern) -> None:
        """Refuse options this pruner cannot honour for ``pattern``, before any work."""

    def make_statistic(self, module: nn.Module) -> InputStatistic:
        """An empty input statistic for ``module`` (``update(inputs)`` is called with each calibration batch)."""
        raise NotImplementedError(f"{type(self).__name__} requires calibration but defines no make_statistic")

    def prune_module(
        self, name: str, module: nn.Module, pattern: SparsityPattern, sparsity: float, statistic: Any
    ) -> torch.Tensor:
        """Prune ``module`` in place (exact zeros); return its keep mask in the layout of its weight."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        calibration: Any = None,
        sparsity: float = 0.5,
        sparsity_type: str | SparsityPattern = "unstructured",
        target_modules: Sequence[str] | None = None,
        exclude_modules: Sequence[str] | None = None,
        batch_size: int = 8,
        progress: bool = True,
        execution_device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prune ``model`` in place; return ``{module_name: keep_mask}`` (True = kept).

        ``calibration``: a LongTensor ``[num_samples, seqlen]`` or a ``datasets.Dataset`` with an ``input_ids``
        column; ignored by pruners that need none. ``execution_device``: for a model on the CPU, where each
        decoder layer runs during calibration (moved there for its turn and back).
        """
        pattern = check_arguments(sparsity, sparsity_type)
        modules = find_prunable_modules(model, target_modules, exclude_modules, pattern)
        self.check(pattern)
        if not self.requires_calibration:
            return {name: self.prune_module(name, module, pattern, sparsity, None) for name, module in modules.items()}
        if calibration is None:
            raise ValueError(f"{self.name}: needs calibration data (token ids [num_samples, seqlen]); none was given.")

        def prune(name: str, module: nn.Module, statistic) -> torch.Tensor:
            if getattr(statistic, "tokens", 1) == 0:
                raise RuntimeError(f"{self.name}: {name} saw no calibration input (is it used in the forward pass?).")
            return self.prune_module(name, module, pattern, sparsity, statistic)

        return prune_layerwise(
            model,
            calibration,
            modules,
            self.make_statistic,
            prune,
            batch_size=batch_size,
            progress=progress,
            desc=self.name,
            execution_device=execution_device,
        )


def register_pruner(pruner: OneShotPruner, *, replace: bool = False) -> OneShotPruner:
    """Make ``pruner`` available as ``ElsaConfig(admm_init=pruner.name)`` and ``hf-elsa prune --method``."""
    return PRUNERS.register(pruner.name, pruner, replace=replace)


def get_pruner(name: str) -> OneShotPruner:
    """The one-shot pruner registered as ``name``."""
    return PRUNERS.get(name)
