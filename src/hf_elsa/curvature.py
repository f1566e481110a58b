"""Diagonal curvature (Hessian-diagonal) estimates for the objective-aware projection (ALGORITHMS.md §4).

The projection scores an entry by ``(h + delta) ** alpha * v ** 2``; this module supplies ``h``.

- ``"magnitude"``: no curvature (score ``|v|``).
- ``"adam"``: the base optimizer's second moment (the paper's "momentum" mode). Free, but it also
  absorbs the ADMM penalty when the penalty goes through the gradient.
- ``"fisher"``: a bias-corrected EMA of the squared task gradient alone, taken by ``ElsaOptimizer.step``
  before the penalty is added (:func:`update_running_mean`).
- ``"hutchinson"``: a bias-corrected EMA of ``|z * Hz|`` for Rademacher probes ``z``, the Hessian-vector
  product taken by double backward (:func:`hutchinson_diagonal`); the trainer refreshes it every
  ``hessian_interval`` steps. With the Sassha base optimizer, Sassha's own estimate is read instead.
- ``"activation"`` (SAFE+, Wanda's metric): ``h_ij = mean over tokens of x_j ** 2`` for input column j
  of the layer -- the exact diagonal of the layer's reconstruction Hessian. Collected by forward hooks
  on the training batches (:class:`ActivationStatistics`), so it needs no calibration pass.

Estimator state lives in the optimizer state (keys ``elsa_*``), so checkpoints carry it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

IMPORTANCES = ("magnitude", "adam", "fisher", "hutchinson", "activation")
# bias-corrected running estimates and the number of updates folded into them
FISHER, FISHER_COUNT = "elsa_fisher", "elsa_fisher_updates"
HESSIAN, HESSIAN_COUNT = "elsa_hessian", "elsa_hessian_refreshes"
# Sassha keeps its own (bias-corrected) Hessian-diagonal estimate under this key: importance="hutchinson"
# reads it when Sassha is the base optimizer, instead of computing a second estimate.
SASSHA_HESSIAN = "hessian_diag"
# attention implementations whose kernels have a double backward (sdpa: with the math backend forced)
DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")
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
    if importance == "fisher":
        return optimizer_state.get(FISHER)  # None before the first step: magnitude
    if importance == "hutchinson":
        h = optimizer_state.get(HESSIAN)
        return h if h is not None else optimizer_state.get(SASSHA_HESSIAN)
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


# -- running estimates ----------------------------------------------------------------------------
@torch.no_grad()
def update_running_mean(state: dict, key: str, count_key: str, value: torch.Tensor, beta: float) -> None:
    """Fold ``value`` into the bias-corrected EMA ``state[key]`` (decay ``beta``, ``state[count_key]`` updates).

    Keeps the corrected estimate ``m_t / (1 - beta**t)`` directly: ``hat_t = hat_{t-1} + w (value - hat_{t-1})``
    with ``w = (1 - beta) / (1 - beta**t)``, algebraically identical to Adam's EMA followed by its bias
    correction (the first update copies ``value``), so no separate ``beta`` is needed to read it.
    """
    count = state.get(count_key, 0) + 1
    weight = (1.0 - beta) / (1.0 - beta**count) if beta < 1.0 else 1.0 / count
    value = value.detach().to(_accumulation_dtype(value))
    if key in state and count > 1:
        state[key].lerp_(value, weight)
    else:
        state[key] = value.clone()
    state[count_key] = count


def update_fisher(state: dict, grad: torch.Tensor, beta: float) -> None:
    """Empirical Fisher diagonal: bias-corrected EMA of ``grad ** 2`` (the task gradient, before the penalty)."""
    update_running_mean(state, FISHER, FISHER_COUNT, grad.detach().to(_accumulation_dtype(grad)).square(), beta)


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Statistics in at least fp32 (a bf16 square underflows), fp64 kept."""
    return torch.promote_types(tensor.dtype, torch.float32)


# -- Hutchinson -----------------------------------------------------------------------------------
def rademacher_like(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Independent +-1 entries shaped like ``tensors``, drawn from ``generator`` in order.

    The same seed gives the same probes on every process (the generator lives on the tensors' device).
    """
    probes = []
    for t in tensors:
        bits = torch.randint(0, 2, t.shape, generator=generator, device=generator.device)
        probes.append(bits.to(device=t.device, dtype=t.dtype) * 2 - 1)
    return probes


def hutchinson_diagonal(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    generator: torch.Generator,
    n_probes: int = 1,
) -> list[torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal, ``|mean_probes(z * Hz)|``, one tensor per parameter.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``; ``Hz`` is then
    ``d(grads . z)/d params``, a second ``torch.autograd.grad`` (never ``loss.backward(create_graph=True)``,
    which leaves the graph referenced from ``.grad`` and leaks). ``E[z * Hz] = diag(H)`` for Rademacher
    ``z``; the absolute value keeps the estimate positive (AdaHessian, Sassha). One probe per refresh is
    the training setting (the EMA averages over refreshes); more probes reduce the variance.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes={n_probes} must be >= 1.")
    grads, params = list(grads), list(params)
    # a parameter without gradient, or whose gradient does not depend on the parameters, has H z = 0 there
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    total = [torch.zeros_like(p, dtype=_accumulation_dtype(p)) for p in params]
    for probe in range(n_probes):
        probes = rademacher_like(params, generator)  # drawn for every parameter: the stream does not depend on `live`
        if not live:
            continue
        hvps = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[probes[i] for i in live],
            retain_graph=probe < n_probes - 1,
            allow_unused=True,
        )
        for acc, z, hz in zip(total, probes, hvps):
            if hz is not None:
                acc.add_((z * hz).to(acc.dtype))
    return [acc.div_(n_probes).abs_() for acc in total]


def probe_generator(seed: int, refresh: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of the probes of refresh number ``refresh``: a function of (seed, refresh) only, so every
    process draws the same probes and a resumed run draws the ones the uninterrupted run would have."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(refresh)) % (2**63))


def check_double_backward(model: nn.Module, what: str) -> None:
    """Raise a clear ``ValueError`` when ``model``'s attention has no double backward (flash, flex, ...)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in DOUBLE_BACKWARD_ATTENTION:
        raise ValueError(
            f"{what} needs Hessian-vector products (double backward), which attn_implementation="
            f"{implementation!r} does not support. Load the model with attn_implementation='eager' or 'sdpa' "
            "(sdpa runs its math kernel during the estimate), or use importance='fisher' / 'adam' / 'activation'."
        )


@contextlib.contextmanager
def double_backward_attention():
    """Force SDPA's math kernel: the flash and memory-efficient kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over processes in place (DDP does not synchronise a double backward)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())
