"""Hutchinson estimate of the Hessian diagonal (Sassha / AdaHessian style).

``E[z * Hz] = diag(H)`` for Rademacher probes ``z``; ``Hz`` comes from a double backward of the training
loss. The trainer refreshes a bias-corrected EMA of ``|z * Hz|`` every ``hessian_interval`` steps. With the
Sassha base optimizer, Sassha's own estimate (the same quantity) is read instead of computing a second one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .base import CurvatureEstimator, accumulation_dtype, register_estimator, update_running_mean

HESSIAN, HESSIAN_COUNT = "elsa_hessian", "elsa_hessian_refreshes"
# Sassha keeps its own (bias-corrected) Hessian-diagonal estimate under this key: importance="hutchinson"
# reads it when Sassha is the base optimizer, instead of computing a second estimate.
SASSHA_HESSIAN = "hessian_diag"
# attention implementations whose kernels have a double backward (sdpa: with the math backend forced)
DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")


class Hutchinson(CurvatureEstimator):
    name = "hutchinson"
    needs_double_backward = True
    bytes_per_weight = 4

    def curvature(self, name: str, state: dict) -> torch.Tensor | None:
        h = state.get(HESSIAN)
        return h if h is not None else state.get(SASSHA_HESSIAN)

    def hessian_refresh_due(self, steps_done: int, interval: int) -> bool:
        return steps_done % interval == 0

    def refreshes(self, state: dict) -> int:
        return state.get(HESSIAN_COUNT, 0)

    def on_hessian_diagonal(self, state: dict, diagonal: torch.Tensor, beta: float) -> None:
        update_running_mean(state, HESSIAN, HESSIAN_COUNT, diagonal, beta)


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
    total = [torch.zeros_like(p, dtype=accumulation_dtype(p)) for p in params]
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
    from ..compat import attention_implementation

    implementation = attention_implementation(model)
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


register_estimator(Hutchinson())
