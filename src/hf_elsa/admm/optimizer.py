"""``ElsaOptimizer``: ADMM as a wrapper around any base optimizer (docs/algorithm.md).

It never copies the training loop: the Trainer calls ``step()`` after clipping the task gradient, and the
wrapper

1. adds the ADMM penalty ``lambda * (W - z + u)`` to the gradient of every prunable weight
   (``admm_penalty="gradient"``, the paper), or pulls the weights towards ``z - u`` after the base step
   (``"proximal"``, a decoupled proximal step that Adam's normalisation cannot slow down);
2. runs the base optimizer's step;
3. every ``interval`` steps updates ``z = Proj(W + u)``, ``u += W - z`` and lambda (rescaling the scaled
   dual when lambda changes);
4. after ``admm_steps`` steps projects the weights themselves once and from then on keeps that mask fixed
   (masked fine-tuning; ``admm_steps = total_steps`` is the paper).

What a projection means comes from three objects parsed once from the settings: the sparsity pattern
(``hf_elsa.patterns``), the curvature estimator that scores entries (``hf_elsa.curvature``) and the
allocation of the sparsity over tensors (``hf_elsa.allocation``). All per-weight state lives in the base
optimizer's ``state[param]`` (``hf_elsa.admm.storage``), so checkpoints carry it with no extra code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..allocation import make_allocation
from ..compat import is_dcp_state_init_call
from ..curvature import get_estimator
from ..patterns import sparsity_pattern
from ..projection import importance_score, zero_pruned_
from .distributed import (
    ShardSums,
    count_reducer,
    full_tensor,
    is_sharded,
    like,
    local,
    rows_whole,
    shard_of,
    vector_shard,
)
from .schedules import lambda_at, sparsity_at
from .storage import ADMM_ONLY_KEYS, ADMM_STEPS, LAMBDA, MASK, PATTERN, STEP, TARGET, Z, ZUStorage

PENALTIES = ("gradient", "proximal")
SPARSITY = "elsa_sparsity"  # the run's requested mean sparsity (a resumed run must ask for the same)


def _encode(text: str) -> tuple[int, ...]:
    # Optimizer.load_state_dict turns str values into generators (it casts every iterable): store code points.
    return tuple(text.encode())


def _decode(codes) -> str | None:
    return None if codes is None else bytes(codes).decode()


def _offenders(named_params, count: Callable[[torch.nn.Parameter], torch.Tensor]) -> list[tuple[str, int]]:
    """``(name, n)`` of the weights where ``count`` (of this process's shard) sums to ``n > 0`` over the processes."""
    named_params = list(named_params)
    if not named_params:
        return []
    sums = ShardSums(len(named_params))
    for i, (_, p) in enumerate(named_params):
        row = [0.0] * len(named_params)
        row[i] = count(p)
        sums.add(p, row)
    return [(name, int(n)) for (name, _), n in zip(named_params, sums.total()) if n > 0]


def _listed(offenders: list[tuple[str, int]], unit: str = "") -> str:
    """The first five offenders for an error message: ``name (n unit), ...``."""
    shown = ", ".join(f"{name} ({n}{unit})" for name, n in offenders[:5])
    return shown + (" ..." if len(offenders) > 5 else "")


class ElsaOptimizer(torch.optim.Optimizer):
    """ADMM around any ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer that does the x-step on all parameters (prunable or not).
        prunable: ``{name: parameter}`` of the weights to sparsify (each must be in ``base_optimizer``).
        settings: an ``ElsaSettings`` (or ``ElsaConfig``): the ELSA fields, under the config's names.
        total_steps: number of optimizer steps of the run (sets the schedules); or later with ``start_run``.
        transposed: names of weights stored as (in_features, out_features) (GPT-2 ``Conv1D``), so that
            row and N:M patterns apply to the right dimension.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        prunable: Mapping[str, torch.nn.Parameter],
        settings,
        total_steps: int | None = None,
        transposed: set[str] | frozenset[str] = frozenset(),
    ):
        # Like accelerate's AcceleratedOptimizer we do not call Optimizer.__init__: param_groups,
        # defaults and state are the base optimizer's own objects, so LR schedulers and
        # checkpoints see one optimizer.
        self.base_optimizer = base_optimizer
        self.prunable = dict(prunable)
        self.settings = settings
        self.pattern = sparsity_pattern(settings.sparsity_type)
        self.estimator = get_estimator(settings.importance)
        self.allocation = make_allocation(settings)
        self.storage = ZUStorage(settings.admm_z_dtype, settings.admm_u_dtype)
        if settings.admm_penalty not in PENALTIES:
            raise ValueError(f"admm_penalty={settings.admm_penalty!r}: use one of {PENALTIES}.")
        self.total_steps = total_steps
        self.resume_step: int | None = None
        self.transposed = frozenset(transposed)
        self.metrics: dict[str, float] = {}
        self.final_removed: float | None = None
        self._pending: dict[torch.nn.Parameter, dict] = {}
        # {name: keep mask} chosen before the run (a one-shot pruner, masks recorded on a loaded model)
        self.initial_masks: dict[str, torch.Tensor] = {}
        # the start's masks (this process's shards) until the mask is fixed: how far the mask search moved
        self._start_masks: dict[str, torch.Tensor] = {}
        # what else defines the run (e.g. the distillation teacher's fingerprint): written into the state at the
        # first step, so that a resume can compare (``recorded``)
        self.run_record: dict[str, float | int] = {}
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
                state[MASK] = like(local(state[MASK]).to(torch.bool), state[MASK])
            if Z in state:
                self.storage.restore(state, p)
        self._check_resumed_state()

    def __repr__(self) -> str:
        return f"ElsaOptimizer({self.base_optimizer.__class__.__name__}, {len(self.prunable)} prunable tensors)"

    # -- the run ----------------------------------------------------------------------------------
    def start_run(self, total_steps: int, resume_step: int | None = None) -> None:
        """Tell the optimizer the run's length (sets the schedules) and, when resuming, the checkpoint's step."""
        self.total_steps = total_steps
        self.resume_step = resume_step

    def set_initial_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Start from these keep masks (whole tensors; a one-shot pruner's or recorded ones) instead of projecting W.

        The weights must already be pruned to them. ADMM's z starts there, or, with no ADMM phase, they are the
        fixed masks. Ignored once the run has state (a resume).
        """
        unknown = sorted(set(masks) - set(self.prunable))
        if unknown:
            raise ValueError(f"initial masks for weights that are not prunable here: {unknown[:5]}")
        self.initial_masks = dict(masks)

    def rebind(self, prunable: Mapping[str, torch.nn.Parameter]) -> None:
        """Point at new parameter objects of the same weights (FSDP2's ``prepare`` replaces them with DTensors).

        Accelerate swaps the base optimizer's parameters in place; the names here must follow. Only before any
        state exists, which is keyed by parameter.
        """
        if self.state:
            raise RuntimeError("ElsaOptimizer.rebind after the first step: the state is keyed by the old parameters.")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        missing = [name for name, p in prunable.items() if id(p) not in owned]
        if missing or set(prunable) != set(self.prunable):
            raise ValueError(f"rebind: parameters not handled by the base optimizer: {missing[:5]}")
        self.prunable = dict(prunable)
        self._pending.clear()

    def recorded(self, key: str):
        """A value the run wrote into the state (``run_record``, sparsity, pattern ...); ``None`` before the first step."""
        state = self.state.get(next(iter(self.prunable.values())), {})
        return state.get(key)

    def _take_initial_mask(self, name: str, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The initial keep mask of ``name`` as this process's shard of ``p`` (whole tensors are given)."""
        mask = self.initial_masks.pop(name, None)
        if mask is None:
            return None
        mask = mask.to(device=local(p).device, dtype=torch.bool)
        return shard_of(mask, p) if is_sharded(p) else mask

    def _check_resumed_state(self) -> None:
        """Refuse a checkpoint whose ADMM state contradicts this run's settings (before any step uses it)."""
        s = self.settings
        pattern = _decode(self.recorded(PATTERN))
        if pattern is not None and pattern != self.pattern.name and not s.keep_mask:
            raise ValueError(
                f"The checkpoint's ADMM state was made with sparsity_type={pattern!r}, this run asks for "
                f"{self.pattern.name!r}: resume with sparsity_type={pattern!r}, or start a new run from the model."
            )
        sparsity = self.recorded(SPARSITY)
        if sparsity is not None and not s.keep_mask and self.pattern.can_ramp and abs(sparsity - s.sparsity) > 1e-9:
            raise ValueError(
                f"The checkpoint's ADMM state was made with sparsity={sparsity}, this run asks for {s.sparsity}: "
                f"resume with sparsity={sparsity}, or start a new run from the model."
            )
        admm_steps, done = self.recorded(ADMM_STEPS), self.steps_done
        if admm_steps is not None and self.total_steps is not None and done < admm_steps > self.total_steps:
            raise ValueError(
                f"The checkpoint fixes the mask at step {admm_steps} (its ADMM phase), after the {self.total_steps} "
                f"steps this run has: resume with max_steps >= {admm_steps}, or start a new run from the model."
            )

    @property
    def admm_steps(self) -> int:
        """Number of ADMM steps before the mask is fixed (0 for ``keep_mask``); a started run keeps its own."""
        if self.settings.keep_mask:
            return 0
        recorded = self.recorded(ADMM_STEPS)
        if recorded is not None:
            return recorded
        if self.total_steps is None:
            raise RuntimeError("ElsaOptimizer.start_run(total_steps) must be called before the first step().")
        return round(self.settings.admm_fraction * self.total_steps)

    @property
    def interval(self) -> int:
        """Steps between z/u updates; ``admm_interval == 0`` means an eighth of the ADMM phase (1..32)."""
        if self.settings.admm_interval:
            return self.settings.admm_interval
        return max(1, min(32, math.ceil(self.admm_steps / 8)))

    @property
    def ramp_steps(self) -> int:
        """Schedules reach their final value at the last z-update before the mask is fixed."""
        return max(self.admm_steps - self.interval, 1)

    def lambda_at(self, step: int) -> float:
        s = self.settings
        return lambda_at(s.admm_lambda_schedule, step, self.ramp_steps, s.admm_lambda_init, s.admm_lambda)

    def sparsity_at(self, step: int) -> float:
        s = self.settings
        final = self.pattern.sparsity(s.sparsity)
        # from the warm start's sparsity when it starts denser than the target (admm_init_sparsity), else from 0;
        # a pattern with one fixed ratio (N:M) ramps only from a denser start
        dense_start = s.admm_init_sparsity is not None and s.admm_init_sparsity < final
        if not (dense_start or self.pattern.can_ramp):
            return final
        start = s.admm_init_sparsity if dense_start else 0.0
        return sparsity_at(s.sparsity_schedule, step, self.ramp_steps, final, start)

    @property
    def steps_done(self) -> int:
        p = next(iter(self.prunable.values()))
        state = self.state.get(p, {})
        if STEP in state:
            return state[STEP]
        return self._pending.get(p, {}).get(STEP, 0)

    @property
    def in_admm_phase(self) -> bool:
        return self.steps_done < self.admm_steps

    def state_for(self, name: str) -> dict:
        """ELSA state of the prunable weight ``name`` (usable before the first step)."""
        return self._state(self.prunable[name])

    def z_and_u(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision z and u of the prunable weight ``name`` (during the ADMM phase), whatever their storage."""
        p = self.prunable[name]
        return self.storage.read(self._state(p), p)

    def _state(self, p: torch.nn.Parameter) -> dict:
        """ELSA state of ``p``: in the base optimizer's state once it has one, pending before."""
        state = self.state.get(p)
        if state is not None and STEP in state:
            return state
        return self._pending.setdefault(p, {})

    # -- projection -----------------------------------------------------------------------------
    def _score(self, name: str, p: torch.nn.Parameter, values: torch.Tensor) -> torch.Tensor:
        curvature = self.estimator.curvature(name, self._state(p))
        if curvature is not None and curvature.dim() == 1:
            # per-input-feature statistics: broadcast over the output dimension of the weight's layout
            # (under FSDP2 only the input features of this process's shard)
            transposed = name in self.transposed
            curvature = vector_shard(curvature, p, 0 if transposed else 1)
            curvature = curvature[:, None] if transposed else curvature[None, :]
        elif curvature is not None:
            curvature = local(curvature)
        return importance_score(values, curvature, self.settings.importance_alpha, self.settings.importance_delta)

    def _tensor_sparsities(self, target: float, values_of: Callable[[str, torch.nn.Parameter], torch.Tensor]):
        """``{name: sparsity}`` of every prunable weight when the mean sparsity is ``target``.

        Uniform: ``target`` everywhere (no score computed). Otherwise the allocation sees every tensor's score
        (this process's shards, held for the call); an allocation fixed once computed (OWL) is stored in the
        state and then scaled with the ramp.
        """
        if self.allocation.name == "uniform" or target <= 0:
            return {name: target for name in self.prunable}
        final = self.settings.sparsity
        stored = [self._state(p).get(TARGET) for p in self.prunable.values()]
        if self.allocation.fixed_once_computed and all(t is not None for t in stored):
            return {name: t * target / final for name, t in zip(self.prunable, stored)}
        if self.allocation.fixed_once_computed and any(
            self.estimator.curvature(n, self._state(p)) is None for n, p in self.prunable.items()
        ):
            return {name: target for name in self.prunable}  # no statistics yet: uniform until there are
        scores = {n: self._score(n, p, values_of(n, p)) for n, p in self.prunable.items()}
        numels = {n: p.numel() for n, p in self.prunable.items()}
        reduce = count_reducer(list(self.prunable.values()))
        if self.allocation.fixed_once_computed:
            allocated = self.allocation.tensor_sparsities(scores, numels, final, reduce)
            for n, p in self.prunable.items():
                self._state(p)[TARGET] = allocated[n]
            return {n: t * target / final for n, t in allocated.items()}
        return self.allocation.tensor_sparsities(scores, numels, target, reduce)

    def _keep_mask(self, name: str, p: torch.nn.Parameter, values: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask of ``values`` (this process's shard of ``p`` when ``p`` is a DTensor; the mask likewise).

        Groups within output rows are projected locally when no process splits rows (FSDP2 shards dim 0 of a
        Linear weight, whole rows). Otherwise the score is gathered, one tensor at a time, the mask of the whole
        tensor is computed on every process exactly as on one process (same ties), and each keeps its shard.
        """
        score = self._score(name, p, values)
        transposed = name in self.transposed
        gather = is_sharded(p) and not (self.pattern.groups_within_rows and rows_whole(p, 1 if transposed else 0))
        if gather:
            score = full_tensor(score, p)
        mask = (
            self.pattern.ramp_mask(score.t(), sparsity).t() if transposed else self.pattern.ramp_mask(score, sparsity)
        )
        if gather:
            return shard_of(mask.contiguous(), p)
        return mask

    @torch.no_grad()
    def check_finite(self, when: str) -> None:
        """Raise a clear error naming the prunable weights with NaN or infinite entries (all processes agree)."""
        bad = _offenders(self.prunable.items(), lambda p: (~torch.isfinite(local(p.detach()))).sum())
        if bad:
            listed = _listed(bad)
            raise FloatingPointError(
                f"{len(bad)} prunable weights hold NaN or infinite values {when}: {listed}. Nothing was saved as "
                "sparse. If training diverged, lower learning_rate (or admm_lambda); if the model came with them, "
                "check how it was loaded."
            )

    # -- state ------------------------------------------------------------------------------------
    def _record_run(self, state: dict) -> None:
        state.update(self.run_record)
        state[ADMM_STEPS] = self.admm_steps
        state[PATTERN] = _encode(self.pattern.name)
        state[SPARSITY] = float(self.settings.sparsity)

    @torch.no_grad()
    def init_state(self, steps_done: int | None = None) -> None:
        """Create the optimizer state's keys (the base optimizer's and ELSA's) without changing any weight.

        ``torch.distributed.checkpoint`` loads into a state-dict template in place (``get_optimizer_state_dict``
        of a fresh optimizer, then ``dcp.load``, then ``set_optimizer_state_dict``), so the template must hold
        the keys the checkpoint holds, which depend on the phase the checkpoint was taken in: z, u, lambda
        during ADMM, the mask after it, the curvature estimator's statistics. ``steps_done``: optimizer steps
        taken when the checkpoint was written (default ``resume_step``, else 0). Values are placeholders that
        the load overwrites. The base optimizer's state comes from one base step with zero gradients and
        learning rate 0.
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
        admm_steps = self.admm_steps
        for name, p in self.prunable.items():
            state = self.state[p]
            state[STEP] = t
            self._record_run(state)
            if t < admm_steps:
                # in the storage format (dtype, FP8 scale key) the checkpoint was written in
                self.storage.write(state, torch.zeros_like(p), torch.zeros_like(p))
                state[LAMBDA] = self.lambda_at(t)
            elif self.settings.keep_mask or self.settings.final_projection:
                state[MASK] = torch.ones_like(p, dtype=torch.bool)
            if t > 0 and admm_steps > 0:
                features = p.shape[0] if name in self.transposed else p.shape[1]
                self.estimator.checkpoint_template(state, features, local(p).device)
            if self.allocation.fixed_once_computed and t > 0:
                state[TARGET] = float(self.settings.sparsity)

    @torch.no_grad()
    def initialize(self) -> None:
        """Create z0 = Proj(W) and u0 = 0 (or the fixed mask) for the weights, unless their state exists.

        Called by the first ``step()``; the trainer calls it before the first forward so that a run that starts
        in the fixed-mask phase never computes a gradient on the dense model. With ``initial_masks`` (a one-shot
        pruner already pruned the weights), z0 is the pruned weights, or that mask is fixed.
        """
        if all(STEP in self._state(p) for p in self.prunable.values()):
            return
        self.check_finite("in the model given to the optimizer")
        admm_steps = self.admm_steps
        for p in self.prunable.values():
            state = self._state(p)
            state[STEP] = 0
            self._record_run(state)
        if admm_steps == 0:
            self._fix_masks()
            return
        sparsities = self._tensor_sparsities(self.sparsity_at(0), lambda n, p: local(p.detach()))
        for name, p in self.prunable.items():
            state = self._state(p)
            z = p.detach().clone()
            initial = self._take_initial_mask(name, p)
            mask = initial if initial is not None else self._keep_mask(name, p, local(z), sparsities[name])
            if initial is not None:
                self._start_masks[name] = initial
            local(z).mul_(mask)
            self.storage.write(state, z, torch.zeros_like(p))
            state[LAMBDA] = self.lambda_at(0)

    @torch.no_grad()
    def _fix_masks(self) -> None:
        """Enter the fixed-mask phase: hard-project every W (or read its zeros for keep_mask); log what it removed."""
        s = self.settings
        self.check_finite(f"when the mask is fixed (step {self.steps_done})")
        sums = ShardSums(4)  # removed, norm^2, zeros and entries whose mask differs from the start's, whole tensors
        if s.keep_mask or not s.final_projection:
            sparsities = {}
        else:
            sparsities = self._tensor_sparsities(s.sparsity, lambda n, p: local(p.detach()))
        for name, p in self.prunable.items():
            state = self._state(p)
            w = local(p.detach())
            initial = self._take_initial_mask(name, p)
            if initial is not None:
                mask = initial
            elif s.keep_mask:
                mask = w != 0
            elif s.final_projection:
                mask = self._keep_mask(name, p, w, sparsities[name])
            else:
                mask = None
            removed = 0.0
            if mask is not None:
                removed = w.float().masked_fill(mask, 0).square().sum()
                zero_pruned_(w, mask)
                state[MASK] = like(mask, p)
            for key in ADMM_ONLY_KEYS:
                state.pop(key, None)
            start = self._start_masks.pop(name, None)
            moved = (start != mask).sum() if start is not None and mask is not None else 0
            sums.add(p, [removed, w.float().square().sum(), (w == 0).sum(), moved])
        removed, norm_sq, zeros, moved = sums.total()
        self.final_removed = math.sqrt(removed) / max(math.sqrt(removed + norm_sq), 1e-30)
        # keep the last ADMM diagnostics: they describe the state the mask was fixed in
        self.metrics.update(
            {
                "elsa/final_projection_removed": self.final_removed,
                "elsa/weight_sparsity": zeros / sum(p.numel() for p in self.prunable.values()),
                # share of the prunable weights whose kept/pruned state the mask search changed from the one-shot start
                "elsa/mask_moved_from_start": moved / sum(p.numel() for p in self.prunable.values()),
            }
        )

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        if is_dcp_state_init_call(self):
            self.init_state()  # torch.distributed.checkpoint building a template: not a training step
            return None
        self.initialize()
        t = self.steps_done
        in_admm = t < self.admm_steps
        s = self.settings

        if in_admm:
            for p in self.prunable.values():
                if p.grad is not None:  # the task gradient alone (clipped, before the penalty joins it)
                    self.estimator.on_task_gradient(self._state(p), p.grad, s.importance_beta)

        if in_admm and s.admm_penalty == "gradient":
            for p in self.prunable.values():
                st = self._state(p)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                # grad += lambda (W - z + u), in place (on this process's shards under FSDP2)
                z, u = map(local, self.storage.read(st, p))
                grad, w = local(p.grad), local(p)
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
                zero_pruned_(local(p), local(st[MASK]))
            elif in_admm and s.admm_penalty == "proximal":
                # W <- W - eta (W - z + u), in place
                eta = st[LAMBDA] / (1.0 + st[LAMBDA])
                z, u = map(local, self.storage.read(st, p))
                local(p).lerp_(z, eta).sub_(u, alpha=eta)

        if in_admm:
            # every step, not only before projections: a checkpoint (saved by one process under DDP,
            # deduplicated across processes by torch.distributed.checkpoint) then never holds per-process sums
            for p in self.prunable.values():
                self.estimator.merge(self.state[p])
        if in_admm and t % self.interval == 0:
            self._update_z_u(t + 1)
        if t + 1 == self.admm_steps:
            self._fix_masks()
        return loss

    @torch.no_grad()
    def _update_z_u(self, step: int) -> None:
        """z <- Proj(W + u); u <- u + W - z; then lambda from its schedule (dual rescaled)."""
        target = self.sparsity_at(step)
        lam_new = self.lambda_at(step)

        def values_of(name, p):
            return local(p.detach()) + local(self.storage.read(self.state[p], p)[1])

        sparsities = self._tensor_sparsities(target, values_of)
        keys = ("w", "w_minus_z", "dz", "off_support", "flips", "zeros")
        sums = ShardSums(len(keys))  # over whole tensors: all-reduced when they are FSDP2 shards
        n = 0
        for name, p in self.prunable.items():
            st = self.state[p]
            w = local(p.detach())
            z_old, u = map(local, self.storage.read(st, p))
            v = w + u
            mask = self._keep_mask(name, p, v, sparsities[name])
            off_support = w.float().masked_fill(mask, 0).square().sum()
            z_new = v.mul_(mask)
            flips = ((z_old != 0) != mask).sum()
            u.add_(w - z_new)  # zero on the support
            lam_old = st[LAMBDA]
            if lam_new != lam_old and lam_old > 0 and lam_new > 0:
                u.mul_(lam_old / lam_new)
            self.storage.write(st, like(z_new, p), like(u, p))
            z_new = local(self.storage.read(st, p)[0])  # as stored: what the penalty will use
            dz = (z_new - z_old).float().square().sum()
            w_minus_z = (w - z_new).float().square().sum()
            sums.add(p, [w.float().square().sum(), w_minus_z, dz, off_support, flips, (w == 0).sum()])
            n += p.numel()
            st[LAMBDA] = lam_new
        sq = dict(zip(keys, sums.total()))
        w_norm = max(math.sqrt(sq["w"]), 1e-30)
        self.metrics = {
            "elsa/lambda": lam_new,
            "elsa/z_sparsity": target,
            "elsa/primal_residual": math.sqrt(sq["w_minus_z"]) / w_norm,
            "elsa/dual_residual": math.sqrt(sq["dz"]) / w_norm,
            "elsa/mask_change": sq["flips"] / n,
            # what projecting W onto z's support would remove now (-> 0 as ADMM converges)
            "elsa/projection_gap": math.sqrt(sq["off_support"]) / w_norm,
            "elsa/weight_sparsity": sq["zeros"] / n,
        }
        if self.allocation.name != "uniform":
            self.metrics["elsa/min_tensor_sparsity"] = min(sparsities.values())
            self.metrics["elsa/max_tensor_sparsity"] = max(sparsities.values())

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of pruned entries in the fixed-mask phase, so clipping and the base
        optimizer's moments see only the weights that remain."""
        for p in self.prunable.values():
            mask = self.state.get(p, {}).get(MASK)
            if mask is not None and p.grad is not None:
                zero_pruned_(local(p.grad), local(mask))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned entries of the weights whose mask is fixed (idempotent)."""
        for p in self.prunable.values():
            mask = self.state.get(p, {}).get(MASK)
            if mask is not None:
                zero_pruned_(local(p.detach()), local(mask))

    @torch.no_grad()
    def check_masks_hold(self, when: str) -> None:
        """Refuse weights that are nonzero where their fixed mask prunes (a checkpoint's optimizer state from
        another run, weights changed behind the optimizer's back), naming the tensors; all processes agree."""
        fixed = [(n, p) for n, p in self.prunable.items() if MASK in self.state.get(p, {})]
        bad = _offenders(fixed, lambda p: (local(p.detach())[~local(self.state[p][MASK])] != 0).sum())
        if bad:
            listed = _listed(bad, " entries")
            raise ValueError(
                f"{when}: {len(bad)} weights are nonzero where the optimizer's fixed mask prunes them: {listed}. The "
                "optimizer state (optimizer.pt) does not belong to these weights (e.g. two runs wrote into one "
                "output_dir); resume from a checkpoint written by one run, or start a new run from the model."
            )

    # -- inspection -----------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: keep_mask}`` of the weights whose mask is fixed (after the ADMM phase)."""
        return {n: self.state[p][MASK] for n, p in self.prunable.items() if MASK in self.state.get(p, {})}
