"""Low-precision storage of the ADMM states z and u (ELSA-L; docs/memory.md).

Pure functions: :func:`pack` turns a full-precision tensor into its stored form and a scale,
:func:`unpack` turns them back. ``ElsaOptimizer`` reads z and u through ``unpack`` and writes them
through ``pack``, so the rest of the ADMM code only ever sees full-precision tensors.

- ``float32``: stored as is (no copy when the tensor already is float32).
- ``bfloat16``: a plain cast; bf16 has float32's exponent range, so no scale is needed.
- ``float8_e4m3fn`` / ``float8_e5m2``: one fp32 scale per tensor, ``scale = max|x| / fp8_max * 1.05``
  (at least ``1e-8``), max-reduced over all processes when ``torch.distributed`` is initialised (so
  every shard of a tensor shares one scale); stored ``= fp8(x / scale)``, read ``= stored * scale``.

z is sparse and its support (``z != 0``) is used as a mask (the ``elsa/mask_change`` metric, the
z-update's flip count). A narrow dtype would flush small nonzero values to zero and change that
support, so :func:`pack` rounds every nonzero value whose magnitude is below the dtype's smallest
subnormal up to that subnormal (keeping its sign): zero stays zero, nonzero stays nonzero, and the
support survives storage exactly at no extra memory. The cost is a bounded error on those tiny
entries: at most one subnormal step (times the scale) instead of half a step.
"""

from __future__ import annotations

import torch

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# headroom of the amax scale: values may grow a little between two writes of a tensor
FP8_MARGIN = 1.05
MIN_SCALE = 1e-8


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` of a storage dtype name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``, ...)."""
    if isinstance(name, torch.dtype) and name in STORAGE_DTYPES.values():
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {name!r}: use one of {tuple(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[name]


def is_scaled(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` needs a per-tensor scale (the FP8 formats)."""
    return dtype in FP8_DTYPES


def smallest_subnormal(dtype: torch.dtype) -> float:
    """Smallest positive value of ``dtype`` (its smallest subnormal)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def fp8_scale(x: torch.Tensor, dtype: torch.dtype) -> float:
    """``max(max|x| / fp8_max * 1.05, 1e-8)``, with ``max|x|`` max-reduced over all processes.

    A ``DTensor`` is reduced over its mesh by its own ``amax``; a plain tensor (a local shard, or a
    replica under DDP) with ``all_reduce(MAX)`` when ``torch.distributed`` is initialised.
    """
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    if hasattr(amax, "full_tensor"):
        amax = amax.full_tensor()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
    scale = amax / torch.finfo(dtype).max * FP8_MARGIN
    return max(float(scale), MIN_SCALE)


def _keep_support(y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (``x`` divided by its scale, fp32) with every entry where ``x != 0`` raised to at least
    ``dtype``'s smallest subnormal in magnitude, with ``x``'s sign."""
    small = (x != 0) & (y.abs() < smallest_subnormal(dtype))
    if not bool(small.any()):
        return y
    return torch.where(small, torch.full_like(y, smallest_subnormal(dtype)).copysign(x), y)


def pack(x: torch.Tensor, dtype: str | torch.dtype) -> tuple[torch.Tensor, float | None]:
    """Stored form of ``x`` in ``dtype`` and its scale (a Python float for FP8, ``None`` otherwise).

    ``x`` itself is returned (no copy) when it already has the storage dtype. Zero entries stay zero
    and nonzero entries stay nonzero (see the module docstring).
    """
    dtype = storage_dtype(dtype)
    if is_scaled(dtype):
        scale = fp8_scale(x, dtype)
        y = x.detach().float() / scale
        return _keep_support(y, x, dtype).to(dtype), scale
    if x.dtype == dtype:
        return x, None
    if smallest_subnormal(dtype) <= smallest_subnormal(x.dtype):
        return x.to(dtype), None  # a wider format (bf16 -> fp32): exact
    return _keep_support(x.detach().float(), x, dtype).to(dtype), None


def unpack(stored: torch.Tensor, scale: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-precision value (in ``dtype``) of a tensor stored by :func:`pack`.

    Returns ``stored`` itself (no copy) when it is unscaled and already has ``dtype``.
    """
    if scale is None:
        return stored if stored.dtype == dtype else stored.to(dtype)
    return stored.to(torch.float32).mul_(scale).to(dtype)


def bytes_per_element(dtype: str | torch.dtype) -> int:
    """Storage bytes of one element of a storage dtype."""
    return storage_dtype(dtype).itemsize
