"""Where ADMM keeps its per-weight state, and how z and u are stored in it.

All of it lives in the base optimizer's ``state[param]`` under ``elsa_*`` keys, so the optimizer's
``state_dict`` -- and with it Trainer checkpoints, resume and sharded (FSDP2) checkpoints -- carries it.
z and u go through ``hf_elsa.states`` (``pack`` / ``unpack``), so the ADMM math only sees full precision.
"""

from __future__ import annotations

import torch

from ..states import is_scaled, pack, storage_dtype, unpack
from .distributed import like, local

Z, U, MASK, STEP, LAMBDA = "elsa_z", "elsa_u", "elsa_mask", "elsa_step", "elsa_lambda"
# per-tensor FP8 scales of z and u (Python floats, like lambda: load_state_dict's dtype cast leaves them alone)
SCALE_KEYS = {Z: "elsa_z_scale", U: "elsa_u_scale"}
# True when u's slots on z's support hold z's rounding residual (z stored in a narrow dtype)
RESIDUAL = "elsa_u_holds_z_residual"
# What the run that wrote the state was doing: the step the mask is fixed at, the pattern and target sparsity
# of this tensor. A resumed run follows them, or refuses settings that contradict them.
ADMM_STEPS, PATTERN, TARGET = "elsa_admm_steps", "elsa_pattern", "elsa_target_sparsity"
ADMM_ONLY_KEYS = (Z, U, LAMBDA, RESIDUAL, *SCALE_KEYS.values())


class ZUStorage:
    """Reads and writes z and u in their storage dtypes.

    u is exactly zero on z's support (a z-update sets z = W + u there, so u + W - z = 0) and z is zero off
    it: when z is stored in a narrow dtype, u's slots on the support hold z's rounding residual instead.
    z then reads back at u's precision on top of z's (fp8 + bf16 residual ~ 13 mantissa bits) at no extra
    memory; the proximal pull would otherwise snap the kept weights onto z's coarse grid.
    """

    def __init__(self, z_dtype: str = "float32", u_dtype: str = "float32"):
        self.dtypes = {Z: storage_dtype(z_dtype), U: storage_dtype(u_dtype)}

    @property
    def z_residual_in_u(self) -> bool:
        """Whether z's rounding residual lives in u (z narrower than float32)."""
        return self.dtypes[Z] != torch.float32

    def _read(self, state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
        """The stored z or u codes in ``p``'s dtype (the stored tensor itself when no conversion is needed)."""
        return unpack(state[key], state.get(SCALE_KEYS[key]), p.dtype)

    def read(self, state: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and u in ``p``'s dtype, z's residual (stored in u's slots on its support) added back."""
        z, u = self._read(state, Z, p), self._read(state, U, p)
        if not state.get(RESIDUAL):
            return z, u
        zl, ul = local(z), local(u)
        support = zl != 0
        return like(zl + ul.masked_fill(~support, 0), p), like(ul.masked_fill(support, 0), p)

    def _write(self, state: dict, key: str, value: torch.Tensor) -> None:
        stored, scale = pack(value, self.dtypes[key])
        state[key] = stored
        if scale is None:
            state.pop(SCALE_KEYS[key], None)
        else:
            state[SCALE_KEYS[key]] = scale

    def write(self, state: dict, z: torch.Tensor, u: torch.Tensor) -> None:
        """Store z and u (full precision, u zero on z's support) in their storage dtypes."""
        self._write(state, Z, z)
        state[RESIDUAL] = self.z_residual_in_u
        if state[RESIDUAL]:
            zq = local(self._read(state, Z, z))
            u = like(torch.where(zq != 0, local(z) - zq, local(u)), u)
        self._write(state, U, u)

    def restore(self, state: dict, p: torch.Tensor) -> None:
        """Bring a loaded z and u back to their storage formats after ``load_state_dict`` cast them to ``p``'s dtype."""
        scales_match = all((SCALE_KEYS[key] in state) == is_scaled(self.dtypes[key]) for key in (Z, U))
        if scales_match and bool(state.get(RESIDUAL)) == self.z_residual_in_u:
            for key in (Z, U):  # exact: the cast to p's dtype widened the stored codes
                state[key] = like(local(state[key]).to(self.dtypes[key]), state[key])
        else:  # written in another format than this run's (e.g. resuming an fp32 run as ELSA-L)
            self.write(state, *self.read(state, p))
