"""Flat minima: the SAM perturbation of SAFE and the Sassha optimizer (docs/curvature.md).

- :func:`sam_perturbation` is the pure step ``e = rho * g / ||g||`` (one global norm over all tensors);
- :func:`perturbed` moves parameters to ``x + e`` for the length of a ``with`` block and restores ``x``
  exactly, by copy (``x + e - e`` is not ``x`` in floating point);
- :class:`Sassha` is a ``torch.optim.Optimizer``: SAM perturbation, a lazily refreshed Hutchinson
  Hessian diagonal taken at the perturbed point, and an Adam-like update preconditioned by its square root.

``ElsaTrainer`` uses the first two for ``ElsaConfig.sam_rho`` (SAFE) and drives :class:`Sassha` for
``ElsaConfig(base_optimizer="sassha")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch

from .curvature import SASSHA_HESSIAN, hutchinson_diagonal, probe_generator, update_running_mean

SASSHA_HESSIAN_COUNT = "hessian_refreshes"


def sam_perturbation(grads: Sequence[torch.Tensor], rho: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """``e = rho * g / (||g|| + eps)`` with ``||g||`` the norm over all of ``grads`` together (SAM)."""
    grads = list(grads)
    if not grads:
        return []
    dtype = torch.promote_types(grads[0].dtype, torch.float32)  # a bf16 sum of squares loses too much
    norms = [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    scale = rho / (norm + eps)
    return [(g.to(dtype) * scale.to(g.device)).to(g.dtype) for g in grads]


@contextlib.contextmanager
def perturbed(params: Sequence[torch.Tensor], perturbation: Sequence[torch.Tensor]):
    """Inside the block ``params`` hold ``x + e``; on exit (also on error) they hold ``x`` again, bit for bit.

    An empty ``perturbation`` (``rho = 0``) leaves the parameters alone and copies nothing.
    """
    params, perturbation = list(params), list(perturbation)
    if not perturbation:
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, e in zip(params, perturbation):
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, x in zip(params, saved):
                p.copy_(x)


class Sassha(torch.optim.Optimizer):
    r"""Sassha: sharpness-aware adaptive second-order optimization (Shin et al., ICML 2025).

    One step, with ``g = grad f(x)``:

    1. ``e = rho * g / ||g||`` (global norm) and ``g~ = grad f(x + e)``;
    2. every ``hessian_interval`` steps (the first step included), a Hutchinson estimate ``|z * Hz|`` of
       the Hessian diagonal at the perturbed point ``x + e``, folded into ``D`` (EMA with ``beta2``);
    3. ``x`` restored exactly; ``m = beta1 m + (1 - beta1) g~``; both bias-corrected;
    4. ``x *= 1 - lr * weight_decay`` (decoupled), ``x -= lr * m_hat / (D_hat ** hessian_power + eps)``.

    Usage. The closure runs the forward pass and returns the loss, *without* calling ``backward``
    (Sassha differentiates it itself, twice on refresh steps)::

        optimizer = Sassha(model.parameters(), lr=1e-3, rho=0.05)
        for x, y in data:
            optimizer.zero_grad()
            loss = optimizer.step(lambda: loss_fn(model(x), y))

    ``step(closure)`` returns the loss at ``x``. If the parameters already hold gradients at ``x`` (you
    called ``loss.backward()`` as for any optimizer) Sassha uses them and evaluates the closure only at
    ``x + e``; it then returns that perturbed loss.

    ``step()`` without a closure is the protocol for a training loop that does the perturbation itself
    (``ElsaTrainer`` does, to replay gradient-accumulation micro-batches): ``p.grad`` must then already be
    the gradient at the perturbed point, and the Hessian estimate is supplied by :meth:`update_hessian`
    whenever :meth:`hessian_refresh_due` says so.

    The estimate ``D_hat`` is kept bias-corrected in ``state[p]["hessian_diag"]`` (a Hessian-diagonal
    estimate that ``ElsaConfig(importance="hutchinson")`` reuses for the projection).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (paper: 0.15 on vision models).
        betas: ``(beta1, beta2)``, decays of the gradient and Hessian EMAs.
        eps: added to ``D_hat ** hessian_power`` (paper: 1e-4).
        weight_decay: decoupled weight decay.
        rho: SAM radius (paper: 0.05-0.25 on vision models); 0 disables the perturbation.
        hessian_interval: steps between Hutchinson refreshes (lazy Hessian, paper: 10).
        hessian_power: exponent of ``D_hat`` (paper: 0.5).
        perturb_eps: added to ``||g||`` in the perturbation.
        seed: seed of the Rademacher probes (each refresh draws from ``(seed, refresh number)``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        hessian_interval: int = 10,
        hessian_power: float = 0.5,
        perturb_eps: float = 1e-12,
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or rho < 0 or perturb_eps < 0:
            raise ValueError("Sassha: lr, eps, weight_decay, rho and perturb_eps must be >= 0.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Sassha: betas={betas} must lie in [0, 1).")
        if int(hessian_interval) != hessian_interval or hessian_interval < 1:
            raise ValueError(f"Sassha: hessian_interval={hessian_interval} must be an integer >= 1.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rho": rho,
            "hessian_power": hessian_power,
        }
        super().__init__(params, defaults)
        self.hessian_interval = int(hessian_interval)
        self.perturb_eps = perturb_eps
        self.seed = seed

    # -- bookkeeping ----------------------------------------------------------------------------
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @property
    def steps_done(self) -> int:
        """Steps taken so far (kept in the state, so a loaded checkpoint continues the count)."""
        return max((int(s.get("step", 0)) for s in self.state.values()), default=0)

    @property
    def refreshes_done(self) -> int:
        return max((int(s.get(SASSHA_HESSIAN_COUNT, 0)) for s in self.state.values()), default=0)

    def hessian_refresh_due(self) -> bool:
        """Whether the coming step refreshes the Hessian estimate (every ``hessian_interval`` steps, from 0)."""
        return self.steps_done % self.hessian_interval == 0

    def probe_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Generator of the next refresh's probes (same on every process, reproducible after a resume)."""
        return probe_generator(self.seed, self.refreshes_done, device)

    @torch.no_grad()
    def update_hessian(self, estimates: dict[torch.Tensor, torch.Tensor]) -> None:
        """Fold fresh ``|z * Hz|`` estimates ``{param: tensor}`` into ``D`` (bias-corrected EMA with ``beta2``)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p in estimates:
                    update_running_mean(self.state[p], SASSHA_HESSIAN, SASSHA_HESSIAN_COUNT, estimates[p], beta2)

    # -- the step -------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            loss = self._perturbed_gradient(closure)
        self._update()
        return loss

    def _perturbed_gradient(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Set ``p.grad`` to the gradient at ``x + e`` (refreshing ``D`` there when due); return a loss."""
        params = self._params()
        first_loss = None
        if all(p.grad is None for p in params):
            with torch.enable_grad():
                first_loss = closure()
                grads = torch.autograd.grad(first_loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        else:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        rho = self.param_groups[0]["rho"]
        refresh = self.hessian_refresh_due()
        perturbation = sam_perturbation(grads, rho, self.perturb_eps) if rho > 0 else []
        with perturbed(params, perturbation), torch.enable_grad():
            loss = closure()
            new_grads = torch.autograd.grad(loss, params, create_graph=refresh, allow_unused=True)
            if refresh:  # the Hessian at the perturbed point, before x is restored
                diagonal = hutchinson_diagonal(new_grads, params, self.probe_generator(params[0].device))
                self.update_hessian(dict(zip(params, diagonal)))
        for p, g in zip(params, new_grads):
            p.grad = None if g is None else g.detach()
        return first_loss if first_loss is not None else loss.detach()

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, eps, wd, power = group["lr"], group["eps"], group["weight_decay"], group["hessian_power"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if SASSHA_HESSIAN not in state:
                    raise RuntimeError(
                        "Sassha has no Hessian estimate for a parameter: call step(closure) (see the class "
                        "docstring), or supply one with update_hessian() before step()."
                    )
                step = int(state.get("step", 0)) + 1
                state["step"] = step
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                exp_avg.lerp_(p.grad.to(exp_avg.dtype), 1.0 - beta1)
                m_hat = exp_avg / (1.0 - beta1**step)
                denominator = state[SASSHA_HESSIAN].to(p.dtype).pow(power).add_(eps)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.addcdiv_(m_hat, denominator, value=-lr)
