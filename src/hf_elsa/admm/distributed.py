"""DTensor plumbing for parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

The ADMM math works on this process's local shard of each tensor; these helpers get the shard, wrap a
computed shard back, slice per-feature vectors to the shard, and sum per-tensor statistics over processes.
Plain tensors (one process, or DDP replicas) pass through unchanged.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """This process's shard of ``t`` (a view: in-place updates reach the DTensor), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def like(local_tensor: torch.Tensor, ref):
    """Wrap a local shard computed for ``ref`` as a DTensor sharded like ``ref`` (``local_tensor`` for plain ``ref``)."""
    if not is_sharded(ref):
        return local_tensor
    return DTensor.from_local(local_tensor, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())


def vector_shard(vector: torch.Tensor, ref, dim: int) -> torch.Tensor:
    """The entries of a full 1-D ``vector`` indexed by dimension ``dim`` of ``ref`` that this process holds."""
    if not is_sharded(ref):
        return vector
    placements = [Shard(0) if isinstance(p, Shard) and p.dim == dim else Replicate() for p in ref.placements]
    full = DTensor.from_local(vector, ref.device_mesh, [Replicate()] * ref.device_mesh.ndim)
    return full.redistribute(ref.device_mesh, placements).to_local()


def rows_whole(ref, row_dim: int) -> bool:
    """Whether no process splits ``ref``'s rows (dimension ``row_dim`` indexes rows; only it may be sharded)."""
    return all(not isinstance(pl, Shard) or pl.dim == row_dim for pl in ref.placements)


def full_tensor(local_tensor: torch.Tensor, ref) -> torch.Tensor:
    """The whole tensor whose shard ``local_tensor`` is (gathered on every process)."""
    return like(local_tensor, ref).full_tensor()


def shard_of(full: torch.Tensor, ref) -> torch.Tensor:
    """This process's shard (laid out like ``ref``) of a tensor every process holds whole."""
    replicated = DTensor.from_local(full, ref.device_mesh, [Replicate()] * ref.device_mesh.ndim)
    return replicated.redistribute(ref.device_mesh, ref.placements).to_local()


def sharding_key(ref):
    """The layout of ``ref``'s shards (``None`` for a plain or fully replicated tensor)."""
    if is_sharded(ref) and any(isinstance(p, Shard) for p in ref.placements):
        return ref.device_mesh, tuple(isinstance(p, Shard) for p in ref.placements)
    return None


def sum_over_shards(partial_sums: dict, size: int) -> list[float]:
    """Add up per-layout partial sums (``{sharding_key: float64 row}``), all-reducing the sharded ones."""
    out = torch.zeros(size, dtype=torch.float64)
    for key, row in partial_sums.items():
        if key is not None:
            mesh, sharded = key
            placements = [Partial() if s else Replicate() for s in sharded]
            row = DTensor.from_local(row.to(mesh.device_type), mesh, placements).full_tensor().cpu()
        out += row
    return out.tolist()


class ShardSums:
    """Per-tensor sums (residual norms, counts) over whole tensors when the tensors are DTensor shards.

    Local partial sums are accumulated per sharding layout and all-reduced once per layout in ``total()``,
    so every process logs the same values; plain (unsharded or DDP-replicated) tensors need no reduction.
    """

    def __init__(self, size: int):
        self.size = size
        self.partial: dict = {}

    def add(self, ref, values: list) -> None:
        key = sharding_key(ref)
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device="cpu") for v in values])
        self.partial[key] = self.partial[key] + row if key in self.partial else row

    def total(self) -> list[float]:
        return sum_over_shards(self.partial, self.size)


def count_reducer(refs: list):
    """A ``reduce`` for ``hf_elsa.allocation``: sums float64 counts over the processes that shard ``refs``.

    All prunable tensors of a model share FSDP2's layout, so one all-reduce over the first sharded tensor's
    mesh serves all of them; without sharding it is the identity.
    """
    sharded = [r for r in refs if sharding_key(r) is not None]
    if not sharded:
        return lambda counts: counts
    key = sharding_key(sharded[0])
    if any(sharding_key(r) != key for r in sharded) or len(sharded) != len(refs):
        raise NotImplementedError(
            "a non-uniform sparsity_allocation needs every prunable weight sharded the same way (FSDP2 fully_shard "
            "of the whole model); use sparsity_allocation='uniform' with this layout."
        )
    mesh, flags = key
    placements = [Partial() if s else Replicate() for s in flags]

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        device = counts.device
        total = DTensor.from_local(counts.to(mesh.device_type), mesh, placements).full_tensor()
        return total.to(device)

    return reduce
