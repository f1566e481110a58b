"""Activation statistics as the curvature (SAFE+'s generalized projection with Wanda's metric).

``h_ij = mean over tokens of x_j ** 2`` for input column j of the layer: the exact diagonal of the layer's
reconstruction Hessian. Collected by forward hooks on the training batches, so no calibration pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CurvatureEstimator, register_estimator

# merged statistics (identical on every process) and this process's not yet merged ones
ACT_SUM, ACT_TOKENS = "elsa_act_sq_sum", "elsa_act_tokens"
ACT_NEW_SUM, ACT_NEW_TOKENS = "elsa_act_new_sq_sum", "elsa_act_new_tokens"


class Activation(CurvatureEstimator):
    name = "activation"
    needs_activation_hooks = True
    bytes_per_input_feature = 4  # the merged fp32 sum; each step's new sum is merged within the step

    def curvature(self, name: str, state: dict) -> torch.Tensor | None:
        total, tokens = state.get(ACT_SUM), state.get(ACT_TOKENS, 0)
        if total is None or tokens == 0:
            return None  # no forward pass seen yet: magnitude
        return total / tokens

    def merge(self, state: dict) -> None:
        merge_statistics(state)

    def forward_hooks(self, modules: dict, state_of, transposed: frozenset[str]) -> ActivationStatistics:
        return ActivationStatistics(modules, state_of, transposed)

    def checkpoint_template(self, state: dict, input_features: int, device) -> None:
        state[ACT_SUM] = torch.zeros(input_features, device=device)
        state[ACT_TOKENS] = 0


class ActivationStatistics:
    """Forward hooks that accumulate ``sum_t x_tj ** 2`` and the token count of each prunable layer's input.

    The sums go into ``state_of(name)`` (the optimizer state of the layer's weight), during training
    forwards only, as this process's new statistics; :func:`merge_statistics` folds them (summed over
    processes) into the statistics the projection reads, so every process projects identically.
    """

    def __init__(self, modules: dict[str, nn.Module], state_of, transposed: frozenset[str] = frozenset()):
        self.modules = modules
        self.state_of = state_of
        self.transposed = transposed
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args):
            if not module.training or not args:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            state = self.state_of(name)
            square_sum = x.square().sum(dim=0)
            if ACT_NEW_SUM in state:
                state[ACT_NEW_SUM].add_(square_sum)
            else:
                state[ACT_NEW_SUM] = square_sum
            state[ACT_NEW_TOKENS] = state.get(ACT_NEW_TOKENS, 0) + x.shape[0]

        return hook

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def merge_statistics(state: dict) -> None:
    """Fold this process's new activation statistics, summed over all processes, into the merged ones."""
    import torch.distributed as dist

    if ACT_NEW_SUM not in state:
        return
    new_sum, new_tokens = state.pop(ACT_NEW_SUM), state.pop(ACT_NEW_TOKENS)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(new_sum)
        tokens = torch.tensor(float(new_tokens), device=new_sum.device)
        dist.all_reduce(tokens)
        new_tokens = int(tokens.item())
    state[ACT_SUM] = state[ACT_SUM] + new_sum if ACT_SUM in state else new_sum
    state[ACT_TOKENS] = state.get(ACT_TOKENS, 0) + new_tokens


register_estimator(Activation())
