"""ADMM as an optimizer wrapper (ALGORITHMS.md §1-2).

``ElsaOptimizer`` wraps whatever base optimizer the Trainer (or the user) built. It never copies the
training loop: the Trainer calls ``step()`` after clipping the task gradient, and the wrapper

1. adds the ADMM penalty ``lambda * (W - z + u)`` to the gradient of every prunable weight
   (``penalty="gradient"``, the paper), or pulls the weights towards ``z - u`` after the base step
   (``penalty="proximal"``, a decoupled proximal step that Adam's normalisation cannot slow down);
2. runs the base optimizer's step;
3. every ``interval`` steps updates ``z = Proj(W + u)``, ``u += W - z`` and lambda (rescaling the
   scaled dual when lambda changes);
4. after ``admm_steps`` steps projects the weights themselves once and from then on keeps that mask
   fixed (masked fine-tuning, the "healing" phase; ``admm_steps = total_steps`` is the paper).

All per-weight state (``elsa_z``, ``elsa_u``, ``elsa_mask``, the step counter and lambda) lives in the
base optimizer's ``state[param]``, so the optimizer's ``state_dict`` -- and with it Trainer
checkpoints, resume and sharded (FSDP) optimizer checkpoints -- carries it with no extra code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .curvature import ACT_SUM, ACT_TOKENS, curvature_for, merge_statistics, update_fisher
from .projection import importance_score, keep_mask, parse_sparsity_type
from .states import is_scaled, pack, storage_dtype, unpack

try:  # DTensor: parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "exponential")
SPARSITY_SCHEDULES = ("constant", "cubic")
PENALTIES = ("gradient", "proximal")

Z, U, MASK, STEP, LAMBDA = "elsa_z", "elsa_u", "elsa_mask", "elsa_step", "elsa_lambda"
# per-tensor FP8 scales of z and u (Python floats, like lambda: load_state_dict's dtype cast leaves them alone)
SCALE_KEYS = {Z: "elsa_z_scale", U: "elsa_u_scale"}
# True when u's slots on z's support hold z's rounding residual (z stored in a narrow dtype)
RESIDUAL = "elsa_u_holds_z_residual"


def lambda_at(schedule: str, step: int, total: int, start: float, end: float) -> float:
    """Penalty weight at ``step`` of ``total`` for a schedule going from ``start`` to ``end``."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "constant":
        return end
    if schedule == "linear":
        return start + (end - start) * frac
    if schedule == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * frac)) / 2
    if schedule == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError("admm_lambda_schedule='exponential' needs admm_lambda_init > 0 and admm_lambda > 0.")
        return start * (end / start) ** frac
    raise ValueError(f"admm_lambda_schedule={schedule!r}: use one of {LAMBDA_SCHEDULES}.")


def sparsity_at(schedule: str, step: int, ramp_steps: int, final: float) -> float:
    """Sparsity target of z: constant, or a cubic ramp 0 -> ``final`` over ``ramp_steps`` (Zhu & Gupta)."""
    if schedule == "constant" or step >= ramp_steps:
        return final
    if schedule == "cubic":
        return final * (1.0 - (1.0 - step / max(ramp_steps, 1)) ** 3)
    raise ValueError(f"sparsity_schedule={schedule!r}: use one of {SPARSITY_SCHEDULES}.")


def _is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t):
    """This process's shard of ``t`` (a view: in-place updates reach the DTensor), or ``t`` itself."""
    return t.to_local() if _is_sharded(t) else t


def _like(local: torch.Tensor, ref):
    """Wrap a local shard computed for ``ref`` as a DTensor sharded like ``ref`` (``local`` for plain ``ref``)."""
    if not _is_sharded(ref):
        return local
    return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())


def _vector_shard(vector: torch.Tensor, ref, dim: int) -> torch.Tensor:
    """The entries of a full 1-D ``vector`` indexed by dimension ``dim`` of ``ref`` that this process holds."""
    if not _is_sharded(ref):
        return vector
    placements = [Shard(0) if isinstance(p, Shard) and p.dim == dim else Replicate() for p in ref.placements]
    full = DTensor.from_local(vector, ref.device_mesh, [Replicate()] * ref.device_mesh.ndim)
    return full.redistribute(ref.device_mesh, placements).to_local()


class _ShardSums:
    """Per-tensor sums (residual norms, counts) over whole tensors when the tensors are DTensor shards.

    Local partial sums are accumulated per sharding layout and all-reduced once per layout in ``total()``,
    so every process logs the same values; plain (unsharded or DDP-replicated) tensors need no reduction.
    """

    def __init__(self, size: int):
        self.size = size
        self.partial: dict = {}

    def add(self, ref, values: list) -> None:
        key = None
        if _is_sharded(ref) and any(isinstance(p, Shard) for p in ref.placements):
            key = (ref.device_mesh, tuple(isinstance(p, Shard) for p in ref.placements))
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device="cpu") for v in values])
        self.partial[key] = self.partial[key] + row if key in self.partial else row

    def total(self) -> list[float]:
        out = torch.zeros(self.size, dtype=torch.float64)
        for key, row in self.partial.items():
            if key is not None:
                mesh, sharded = key
                placements = [Partial() if s else Replicate() for s in sharded]
                row = row.to(mesh.device_type)
                row = DTensor.from_local(row, mesh, placements).full_tensor().cpu()
            out += row
        return out.tolist()


@dataclass
class AdmmSettings:
    """What ``ElsaOptimizer`` needs to know; ``ElsaConfig`` builds it (``ElsaConfig.admm_settings()``)."""

    sparsity: float = 0.7
    sparsity_type: str = "unstructured"
    interval: int = 32
    penalty: str = "gradient"
    lambda_schedule: str = "constant"
    lambda_init: float = 0.0
    lambda_final: float = 0.01
    sparsity_schedule: str = "constant"
    admm_fraction: float = 1.0
    importance: str = "magnitude"
    importance_alpha: float = 1.0
    importance_delta: float = 1e-12
    importance_beta: float = 0.99
    final_projection: bool = True
    keep_mask: bool = False
    z_dtype: str = "float32"
    u_dtype: str = "float32"

    def __post_init__(self):
        parse_sparsity_type(self.sparsity_type)
        storage_dtype(self.z_dtype)
        storage_dtype(self.u_dtype)
        for name, value, allowed in (
            ("penalty", self.penalty, PENALTIES),
            ("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES),
            ("sparsity_schedule", self.sparsity_schedule, SPARSITY_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {allowed}.")


class ElsaOptimizer(torch.optim.Optimizer):
    """ADMM around any ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer that does the x-step on all parameters (prunable or not).
        prunable: ``{name: parameter}`` of the weights to sparsify (each must be in ``base_optimizer``).
        settings: the ADMM hyper-parameters.
        total_steps: number of optimizer steps of the run (sets the schedules); may be set later
            through the attribute of the same name, before the first ``step()``.
        transposed: names of weights stored as (in_features, out_features) (GPT-2 ``Conv1D``), so that
            row and N:M patterns apply to the right dimension.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        prunable: Mapping[str, torch.nn.Parameter],
        settings: AdmmSettings,
        total_steps: int | None = None,
        transposed: set[str] | frozenset[str] = frozenset(),
    ):
        # Like accelerate's AcceleratedOptimizer we do not call Optimizer.__init__: param_groups,
        # defaults and state are the base optimizer's own objects, so LR schedulers and
        # checkpoints see one optimizer.
        self.base_optimizer = base_optimizer
        self.prunable = dict(prunable)
        self.settings = settings
        self.total_steps = total_steps
        self.transposed = frozenset(transposed)
        self.metrics: dict[str, float] = {}
        self.final_removed: float | None = None
        self._pending: dict[torch.nn.Parameter, dict] = {}
        # {name: (pruned weight, keep mask)} from a one-shot pruner, consumed by initialize()
        self.warm_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # steps taken by the checkpoint about to be loaded into this fresh optimizer (see init_state)
        self.resume_step: int | None = None
        owned = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.prunable.items() if id(p) not in owned]
        if missing:
            raise ValueError(f"prunable weights not handled by the base optimizer: {missing[:5]}")
        if not self.prunable:
            raise ValueError("ElsaOptimizer got no prunable weights.")

    # -- the Optimizer surface, delegated -------------------------------------------------------
    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base_optimizer.param_groups = value

    @property
    def defaults(self):
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.base_optimizer.defaults = value

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, value):
        self.base_optimizer.state = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # torch casts every floating-point state tensor to the parameter's dtype on load: undo it
        # for the mask, which is boolean, and for z and u, which keep their storage dtype.
        for p in self.prunable.values():
            state = self.state.get(p, {})
            if MASK in state and state[MASK].dtype != torch.bool:
                state[MASK] = _like(_local(state[MASK]).to(torch.bool), state[MASK])
            if Z in state:
                self._restore(state, p)

    def __repr__(self) -> str:
        return f"ElsaOptimizer({self.base_optimizer.__class__.__name__}, {len(self.prunable)} prunable tensors)"

    # -- schedule -------------------------------------------------------------------------------
    @property
    def admm_steps(self) -> int:
        """Number of ADMM steps before the mask is fixed (0 for ``keep_mask``)."""
        if self.settings.keep_mask:
            return 0
        if self.total_steps is None:
            raise RuntimeError("ElsaOptimizer.total_steps must be set before the first step().")
        return round(self.settings.admm_fraction * self.total_steps)

    @property
    def interval(self) -> int:
        """Steps between z/u updates; ``settings.interval == 0`` means an eighth of the ADMM phase (1..32)."""
        if self.settings.interval:
            return self.settings.interval
        return max(1, min(32, math.ceil(self.admm_steps / 8)))

    @property
    def ramp_steps(self) -> int:
        """Schedules reach their final value at the last z-update before the mask is fixed."""
        return max(self.admm_steps - self.interval, 1)

    def lambda_at(self, step: int) -> float:
        s = self.settings
        return lambda_at(s.lambda_schedule, step, self.ramp_steps, s.lambda_init, s.lambda_final)

    def sparsity_at(self, step: int) -> float:
        s = self.settings
        if parse_sparsity_type(s.sparsity_type)[0] == "N:M":
            return s.sparsity  # an N:M pattern cannot be ramped; keep_mask ignores the value
        return sparsity_at(s.sparsity_schedule, step, self.ramp_steps, s.sparsity)

    @property
    def steps_done(self) -> int:
        p = next(iter(self.prunable.values()))
        state = self.state.get(p, {})
        if STEP in state:
            return state[STEP]
        return self._pending.get(p, {}).get(STEP, 0)

    def state_for(self, name: str) -> dict:
        """ELSA state of the prunable weight ``name`` (usable before the first step)."""
        return self._state(self.prunable[name])

    def z_and_u(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision z and u of the prunable weight ``name`` (during the ADMM phase), whatever their storage."""
        p = self.prunable[name]
        return self._read_z_u(self._state(p), p)

    def _state(self, p: torch.nn.Parameter) -> dict:
        """ELSA state of ``p``: in the base optimizer's state once it has one, pending before."""
        state = self.state.get(p)
        if state is not None and STEP in state:
            return state
        return self._pending.setdefault(p, {})

    # -- z and u storage (hf_elsa.states) -------------------------------------------------------
    # u is exactly zero on z's support (a z-update sets z = W + u there, so u + W - z = 0) and z is zero
    # off it: when z is stored in a narrow dtype, u's slots on the support hold z's rounding residual
    # instead. z then reads back at u's precision on top of z's (fp8 + bf16 residual ~ 13 mantissa bits)
    # at no extra memory; the proximal pull would otherwise snap the kept weights onto z's coarse grid.
    def _storage_dtype(self, key: str) -> torch.dtype:
        return storage_dtype(self.settings.z_dtype if key == Z else self.settings.u_dtype)

    @property
    def _z_residual_in_u(self) -> bool:
        """Whether this run stores z's rounding residual in u (z narrower than float32)."""
        return self._storage_dtype(Z) != torch.float32

    def _read(self, state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
        """The stored z or u codes in ``p``'s dtype (the stored tensor itself when no conversion is needed)."""
        return unpack(state[key], state.get(SCALE_KEYS[key]), p.dtype)

    def _read_z_u(self, state: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and u in ``p``'s dtype, z's residual (stored in u's slots on its support) added back."""
        z, u = self._read(state, Z, p), self._read(state, U, p)
        if not state.get(RESIDUAL):
            return z, u
        zl, ul = _local(z), _local(u)
        support = zl != 0
        return _like(zl + ul.masked_fill(~support, 0), p), _like(ul.masked_fill(support, 0), p)

    def _write(self, state: dict, key: str, value: torch.Tensor) -> None:
        """Store z or u in its storage dtype (``value`` itself when no conversion is needed)."""
        stored, scale = pack(value, self._storage_dtype(key))
        state[key] = stored
        if scale is None:
            state.pop(SCALE_KEYS[key], None)
        else:
            state[SCALE_KEYS[key]] = scale

    def _write_z_u(self, state: dict, z: torch.Tensor, u: torch.Tensor) -> None:
        """Store z and u (full precision, u zero on z's support) in their storage dtypes."""
        self._write(state, Z, z)
        state[RESIDUAL] = self._z_residual_in_u
        if state[RESIDUAL]:
            zq = _local(self._read(state, Z, z))
            u = _like(torch.where(zq != 0, _local(z) - zq, _local(u)), u)
        self._write(state, U, u)

    def _restore(self, state: dict, p: torch.Tensor) -> None:
        """Bring a loaded z and u back to their storage formats after ``load_state_dict`` cast them to ``p``'s dtype."""
        scales_match = all((SCALE_KEYS[key] in state) == is_scaled(self._storage_dtype(key)) for key in (Z, U))
        same_format = scales_match and bool(state.get(RESIDUAL)) == self._z_residual_in_u
        if same_format:
            for key in (Z, U):  # exact: the cast to p's dtype widened the stored codes
                state[key] = _like(_local(state[key]).to(self._storage_dtype(key)), state[key])
        else:  # written in another format than this run's (e.g. resuming an fp32 run as ELSA-L)
            self._write_z_u(state, *self._read_z_u(state, p))

    # -- projection -----------------------------------------------------------------------------
    def _score(self, name: str, p: torch.nn.Parameter, values: torch.Tensor) -> torch.Tensor:
        curvature = curvature_for(self.settings.importance, name, p, self._state(p))
        if curvature is not None and curvature.dim() == 1:
            # per-input-feature statistics: broadcast over the output dimension of the weight's layout
            # (under FSDP2 only the input features of this process's shard)
            transposed = name in self.transposed
            curvature = _vector_shard(curvature, p, 0 if transposed else 1)
            curvature = curvature[:, None] if transposed else curvature[None, :]
        elif curvature is not None:
            curvature = _local(curvature)
        return importance_score(values, curvature, self.settings.importance_alpha, self.settings.importance_delta)

    def _merge_statistics(self) -> None:
        """Fold the activation statistics gathered since the last projection (all processes) in."""
        if self.settings.importance == "activation":
            for p in self.prunable.values():
                merge_statistics(self._state(p))

    def _keep_mask(self, name: str, p: torch.nn.Parameter, values: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask of ``values`` (this process's shard of ``p`` when ``p`` is a DTensor; the mask likewise)."""
        score = self._score(name, p, values)
        if _is_sharded(p):
            return self._sharded_keep_mask(name, p, score, sparsity)
        if name in self.transposed:
            return keep_mask(score.t(), sparsity, self.settings.sparsity_type).t()
        return keep_mask(score, sparsity, self.settings.sparsity_type)

    def _sharded_keep_mask(self, name: str, p, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask of a DTensor's local ``score`` shard, identical to the unsharded projection of the whole tensor.

        Row and N:M groups lie inside one output row; when no process splits output rows (FSDP2 shards
        dim 0 of a Linear weight, whole rows), each shard is projected on its own. Otherwise (per-tensor
        selection, or a transposed Conv1D weight) the score is gathered, one tensor at a time, the mask of
        the whole tensor is computed on every process exactly as on one process (same ties), and each
        keeps its shard: a transient full fp32 score and bool mask of the largest prunable tensor.
        """
        transposed = name in self.transposed
        row_dim = 1 if transposed else 0
        kind = parse_sparsity_type(self.settings.sparsity_type)[0]
        rows_whole = all(not isinstance(pl, Shard) or pl.dim == row_dim for pl in p.placements)
        if kind != "unstructured" and rows_whole:
            if transposed:
                return keep_mask(score.t(), sparsity, self.settings.sparsity_type).t()
            return keep_mask(score, sparsity, self.settings.sparsity_type)
        full = _like(score, p).full_tensor()
        if transposed:
            mask = keep_mask(full.t(), sparsity, self.settings.sparsity_type).t().contiguous()
        else:
            mask = keep_mask(full, sparsity, self.settings.sparsity_type)
        del full
        replicated = DTensor.from_local(mask, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
        return replicated.redistribute(p.device_mesh, p.placements).to_local()

    @torch.no_grad()
    def init_state(self, steps_done: int | None = None) -> None:
        """Create the optimizer state's keys (the base optimizer's and ELSA's) without changing any weight.

        ``torch.distributed.checkpoint`` loads into a state-dict template in place (``get_optimizer_state_dict``
        of a fresh optimizer, then ``dcp.load``, then ``set_optimizer_state_dict``), so the template must hold
        the keys the checkpoint holds, which depend on the phase the checkpoint was taken in: ``elsa_z``,
        ``elsa_u``, ``elsa_lambda`` during ADMM, ``elsa_mask`` after it, the merged activation statistics
        with ``importance="activation"``. ``steps_done``: optimizer steps taken when the checkpoint was written
        (default ``resume_step``, else 0). Values are placeholders that the load overwrites. The base
        optimizer's state comes from one base step with zero gradients and learning rate 0.
        """
        if self.state:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        lrs = [group.get("lr") for group in self.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for group in self.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        self.base_optimizer.step()
        for group, lr in zip(self.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
        self._pending.clear()
        t = steps_done if steps_done is not None else (self.resume_step or 0)
        for name, p in self.prunable.items():
            state = self.state[p]
            state[STEP] = t
            if t < self.admm_steps:
                # in the storage format (dtype, FP8 scale key) the checkpoint was written in
                self._write_z_u(state, torch.zeros_like(p), torch.zeros_like(p))
                state[LAMBDA] = self.lambda_at(t)
            elif self.settings.keep_mask or self.settings.final_projection:
                state[MASK] = torch.ones_like(p, dtype=torch.bool)
            if self.settings.importance == "activation" and t > 0 and self.admm_steps > 0:
                features = p.shape[0] if name in self.transposed else p.shape[1]
                state[ACT_SUM] = torch.zeros(features, device=_local(p).device)
                state[ACT_TOKENS] = 0

    def _is_state_init_call(self) -> bool:
        """``torch.distributed.checkpoint.state_dict`` creates a fresh optimizer's state by calling ``step()``
        with all-zero gradients and learning rate 0 (``_init_optim_state``); an ADMM step there would move the
        weights (proximal pull, final projection) after the model was loaded."""
        if self.state or any(group.get("lr", 1.0) != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return all(not bool(_local(g).any()) for g in grads)

    @torch.no_grad()
    def initialize(self) -> None:
        """Create z0 = Proj(W) and u0 = 0 (or the fixed mask) for weights that have no state yet.

        Called by the first ``step()``; the trainer calls it before the first forward so that a run
        that starts in the fixed-mask phase never computes a gradient on the dense model.
        """
        if self.admm_steps < 0:
            raise ValueError("admm_fraction must be >= 0.")
        for name, p in self.prunable.items():
            state = self._state(p)
            if STEP in state:
                continue
            state[STEP] = 0
            warm = self.warm_start.pop(name, None)
            if warm is not None and _is_sharded(p):
                raise NotImplementedError(
                    f"{name}: one-shot initial masks (ElsaConfig.admm_init, keep_mask with recorded masks) are not "
                    "supported with sharded (FSDP2) parameters; use admm_init='magnitude' or DDP."
                )
            if self.admm_steps == 0 and warm is not None:
                p.detach().copy_(warm[0])
                state[MASK] = warm[1].to(device=p.device, dtype=torch.bool)
            elif self.admm_steps == 0:
                self._fix_mask(name, p, state)
            else:
                if warm is not None:
                    z = warm[0].to(device=p.device, dtype=p.dtype).clone()
                else:
                    z = p.detach().clone()
                    _local(z).mul_(self._keep_mask(name, p, _local(z), self.sparsity_at(0)))
                self._write_z_u(state, z, torch.zeros_like(p))
                state[LAMBDA] = self.lambda_at(0)

    def _fix_mask(self, name: str, p: torch.nn.Parameter, state: dict) -> float:
        """Enter the fixed-mask phase: hard-project W (or read its zeros for keep_mask).

        Returns the squared norm the projection removed from this process's shard of W.
        """
        w = _local(p.detach())
        if self.settings.keep_mask:
            mask = w != 0
        elif self.settings.final_projection:
            mask = self._keep_mask(name, p, w, self.settings.sparsity)
        else:
            mask = None
        removed = 0.0
        if mask is not None:
            removed = w.float().masked_fill(mask, 0).square().sum()
            w.masked_fill_(~mask, 0)
            state[MASK] = _like(mask, p)
        for key in (Z, U, LAMBDA, RESIDUAL, *SCALE_KEYS.values()):
            state.pop(key, None)
        return removed

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        if self._is_state_init_call():
            self.init_state()  # torch.distributed.checkpoint building a template: not a training step
            return None
        self.initialize()
        t = self.steps_done
        in_admm = t < self.admm_steps
        s = self.settings

        if in_admm and s.importance == "fisher":
            # the task gradient alone (clipped, before the penalty joins it)
            for p in self.prunable.values():
                if p.grad is not None:
                    update_fisher(self._state(p), p.grad, s.importance_beta)

        if in_admm and s.penalty == "gradient":
            for p in self.prunable.values():
                st = self._state(p)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                # grad += lambda (W - z + u), in place (on this process's shards under FSDP2)
                z, u = map(_local, self._read_z_u(st, p))
                grad, w = _local(p.grad), _local(p)
                grad.add_(w, alpha=st[LAMBDA]).sub_(z, alpha=st[LAMBDA]).add_(u, alpha=st[LAMBDA])

        loss = self.base_optimizer.step(closure)

        # Move pending state into the base optimizer's state only now: Adam-style optimizers
        # initialise a parameter's state when they find it empty.
        for p, pending in self._pending.items():
            self.state[p].update(pending)
        self._pending.clear()

        for p in self.prunable.values():
            st = self.state[p]
            st[STEP] = t + 1
            if MASK in st:
                _local(p).masked_fill_(~_local(st[MASK]), 0)
            elif in_admm and s.penalty == "proximal":
                # W <- W - eta (W - z + u), in place
                eta = st[LAMBDA] / (1.0 + st[LAMBDA])
                z, u = map(_local, self._read_z_u(st, p))
                _local(p).lerp_(z, eta).sub_(u, alpha=eta)

        if in_admm:
            # every step, not only before projections: a checkpoint (saved by one process under DDP,
            # deduplicated across processes by torch.distributed.checkpoint) then never holds per-process sums
            self._merge_statistics()
        if in_admm and t % self.interval == 0:
            self._update_z_u(t + 1)
        if t + 1 == self.admm_steps:
            sums = _ShardSums(3)  # removed, norm^2 and zeros, over whole tensors
            for n, p in self.prunable.items():
                removed = self._fix_mask(n, p, self.state[p])
                w = _local(p.detach())
                sums.add(p, [removed, w.float().square().sum(), (w == 0).sum()])
            removed, norm_sq, zeros = sums.total()
            total = math.sqrt(removed + norm_sq)
            self.final_removed = math.sqrt(removed) / max(total, 1e-30)
            # keep the last ADMM diagnostics: they describe the state the mask was fixed in
            self.metrics.update(
                {
                    "elsa/final_projection_removed": self.final_removed,
                    "elsa/weight_sparsity": zeros / sum(p.numel() for p in self.prunable.values()),
                }
            )
        return loss

    @torch.no_grad()
    def _update_z_u(self, step: int) -> None:
        """z <- Proj(W + u); u <- u + W - z; then lambda from its schedule (dual rescaled)."""
        target = self.sparsity_at(step)
        lam_new = self.lambda_at(step)
        keys = ("w", "w_minus_z", "dz", "off_support", "flips", "zeros")
        sums = _ShardSums(len(keys))  # over whole tensors: all-reduced when they are FSDP2 shards
        n = 0
        for name, p in self.prunable.items():
            st = self.state[p]
            w = _local(p.detach())
            z_old, u = map(_local, self._read_z_u(st, p))
            v = w + u
            mask = self._keep_mask(name, p, v, target)
            off_support = w.float().masked_fill(mask, 0).square().sum()
            z_new = v.mul_(mask)
            flips = ((z_old != 0) != mask).sum()
            u.add_(w - z_new)  # zero on the support
            lam_old = st[LAMBDA]
            if lam_new != lam_old and lam_old > 0 and lam_new > 0:
                u.mul_(lam_old / lam_new)
            self._write_z_u(st, _like(z_new, p), _like(u, p))
            z_new = _local(self._read_z_u(st, p)[0])  # as stored: what the penalty will use
            dz = (z_new - z_old).float().square().sum()
            w_minus_z = (w - z_new).float().square().sum()
            sums.add(p, [w.float().square().sum(), w_minus_z, dz, off_support, flips, (w == 0).sum()])
            n += p.numel()
            st[LAMBDA] = lam_new
        sq = dict(zip(keys, sums.total()))
        sq["n"] = n
        w_norm = max(math.sqrt(sq["w"]), 1e-30)
        self.metrics = {
            "elsa/lambda": lam_new,
            "elsa/z_sparsity": target,
            "elsa/primal_residual": math.sqrt(sq["w_minus_z"]) / w_norm,
            "elsa/dual_residual": math.sqrt(sq["dz"]) / w_norm,
            "elsa/mask_change": sq["flips"] / sq["n"],
            # what projecting W onto z's support would remove now (-> 0 as ADMM converges)
            "elsa/projection_gap": math.sqrt(sq["off_support"]) / w_norm,
            "elsa/weight_sparsity": sq["zeros"] / sq["n"],
        }

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of pruned entries in the fixed-mask phase, so clipping and the base
        optimizer's moments see only the weights that remain."""
        for p in self.prunable.values():
            mask = self.state.get(p, {}).get(MASK)
            if mask is not None and p.grad is not None:
                _local(p.grad).masked_fill_(~_local(mask), 0)

    # -- inspection -----------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: keep_mask}`` of the weights whose mask is fixed (after the ADMM phase)."""
        return {n: self.state[p][MASK] for n, p in self.prunable.items() if MASK in self.state.get(p, {})}

    @property
    def in_admm_phase(self) -> bool:
        return self.steps_done < self.admm_steps
