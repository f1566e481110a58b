"""Diagonal curvature (Hessian-diagonal) estimates for the objective-aware projection (ALGORITHMS.md §4).

The projection scores an entry by ``(h + delta) ** alpha * v ** 2``; this module supplies ``h``.

- ``"magnitude"``: no curvature (score ``|v|``).
- ``"adam"``: the base optimizer's second moment (the paper's "momentum" mode). Free, but it also
  absorbs the ADMM penalty when the penalty goes through the gradient.
- ``"activation"`` (SAFE+, Wanda's metric): ``h_ij = mean over tokens of x_j ** 2`` for input column j
  of the layer -- the exact diagonal of the layer's reconstruction Hessian. Collected by forward hooks
  on the training batches (:class:`ActivationStatistics`), so it needs no calibration pass.

Estimator state lives in the optimizer state (keys ``elsa_act_*``), so checkpoints carry it.
"""

from __future__ import annotations

import torch
from torch import nn

IMPORTANCES = ("magnitude", "adam", "activation")
# merged statistics (identical on every process) and this process's not yet merged ones
ACT_SUM, ACT_TOKENS = "elsa_act_sq_sum", "elsa_act_tokens"
ACT_NEW_SUM, ACT_NEW_TOKENS = "elsa_act_new_sq_sum", "elsa_act_new_tokens"


def curvature_for(importance: str, name: str, param: torch.Tensor, optimizer_state: dict) -> torch.Tensor | None:
    """The curvature estimate ``h`` of ``param`` for ``importance``, or ``None`` for magnitude.

    For ``"activation"`` the result is 1-D (one value per input feature); the caller broadcasts it
    over the weight's output dimension.
    """
    if importance == "magnitude":
        return None
    if importance == "adam":
        h = optimizer_state.get("exp_avg_sq")
        if h is None:
            # before the first base step there is no second moment yet: fall back to magnitude
            if "step" in optimizer_state:
                raise ValueError(
                    f"importance='adam' needs an Adam-style base optimizer with an 'exp_avg_sq' state; {name} has "
                    f"state keys {sorted(optimizer_state)}. Use importance='magnitude' or an Adam optimizer."
                )
            return None
        return h
    if importance == "activation":
        total = optimizer_state.get(ACT_SUM)
        tokens = optimizer_state.get(ACT_TOKENS, 0)
        if total is None or tokens == 0:
            return None  # no forward pass seen yet: magnitude
        return total / tokens
    raise ValueError(f"importance={importance!r}: use one of {IMPORTANCES}.")


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
