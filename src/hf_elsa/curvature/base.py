"""``CurvatureEstimator``: one diagonal curvature estimate ``h`` for the objective-aware projection.

The projection scores an entry by ``(h + delta) ** alpha * v ** 2``. An estimator owns everything about
its ``h``: where it reads it from, how it updates it (from the task gradient, forward hooks or a Hessian
refresh), the keys a sharded-checkpoint template needs, and its memory. Its state lives in the optimizer
state of the weight it describes (keys ``elsa_*``), so checkpoints carry it.
"""

from __future__ import annotations

import torch

from ..registry import Registry


class CurvatureEstimator:
    """The no-curvature estimator's behaviour; subclasses override what their ``h`` needs."""

    #: the name users pass as ``ElsaConfig.importance``
    name: str = ""
    #: forward hooks on the prunable layers collect its statistics during the ADMM phase
    needs_activation_hooks: bool = False
    #: it needs a double backward (Hessian-vector products) of the training loss
    needs_double_backward: bool = False
    #: fp32 bytes per prunable weight its state takes (activation statistics count per input feature)
    bytes_per_weight: int = 0
    bytes_per_input_feature: int = 0

    def curvature(self, name: str, state: dict) -> torch.Tensor | None:
        """``h`` for the weight whose optimizer state is ``state``: the weight's shape, one value per input
        feature (1-D), or ``None`` for magnitude (also before any statistics exist)."""
        return None

    def on_task_gradient(self, state: dict, grad: torch.Tensor, beta: float) -> None:
        """Called every ADMM step with the clipped task gradient, before the penalty joins it."""

    def merge(self, state: dict) -> None:
        """Called every ADMM step: fold statistics gathered since the last call (all processes) in."""

    def checkpoint_template(self, state: dict, input_features: int, device) -> None:
        """Create placeholder state keys a checkpoint of a run past its first step holds (sharded loading)."""

    # -- what the trainer asks of it (it only calls these) -----------------------------------------------
    def forward_hooks(self, modules: dict, state_of, transposed: frozenset[str]):
        """An object with ``attach()`` / ``remove()`` / ``attached`` that collects statistics from the prunable
        layers' forwards during the ADMM phase, or ``None`` when this estimator needs none."""
        return

    def hessian_refresh_due(self, steps_done: int, interval: int) -> bool:
        """Whether the trainer should compute a Hessian diagonal (a double backward) after this step's window."""
        return False

    def refreshes(self, state: dict) -> int:
        """How many Hessian diagonals were folded in so far (seeds the next probes identically on every rank)."""
        return 0

    def on_hessian_diagonal(self, state: dict, diagonal: torch.Tensor, beta: float) -> None:
        """Fold one Hessian-diagonal estimate of the weight whose optimizer state is ``state`` in."""

    def state_bytes(self, prunable: int, input_features: int) -> int:
        """Bytes of this estimator's state for ``prunable`` weights with ``input_features`` inputs in all."""
        return self.bytes_per_weight * prunable + self.bytes_per_input_feature * input_features


# estimators by name (``ElsaConfig.importance``); each module registers its own
ESTIMATORS: Registry[CurvatureEstimator] = Registry("importance")


def register_estimator(estimator: CurvatureEstimator, *, replace: bool = False) -> CurvatureEstimator:
    """Make ``estimator`` available as ``ElsaConfig(importance=estimator.name)``."""
    return ESTIMATORS.register(estimator.name, estimator, replace=replace)


def get_estimator(name: str) -> CurvatureEstimator:
    """The estimator registered as ``name``."""
    return ESTIMATORS.get(name)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Statistics in at least fp32 (a bf16 square underflows), fp64 kept."""
    return torch.promote_types(tensor.dtype, torch.float32)


@torch.no_grad()
def update_running_mean(state: dict, key: str, count_key: str, value: torch.Tensor, beta: float) -> None:
    """Fold ``value`` into the bias-corrected EMA ``state[key]`` (decay ``beta``, ``state[count_key]`` updates).

    Keeps the corrected estimate ``m_t / (1 - beta**t)`` directly: ``hat_t = hat_{t-1} + w (value - hat_{t-1})``
    with ``w = (1 - beta) / (1 - beta**t)``, algebraically identical to Adam's EMA followed by its bias
    correction (the first update copies ``value``), so no separate ``beta`` is needed to read it.
    """
    count = state.get(count_key, 0) + 1
    weight = (1.0 - beta) / (1.0 - beta**count) if beta < 1.0 else 1.0 / count
    value = value.detach().to(accumulation_dtype(value))
    if key in state and count > 1:
        state[key].lerp_(value, weight)
    else:
        state[key] = value.clone()
    state[count_key] = count
