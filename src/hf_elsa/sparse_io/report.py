"""The sparsity report of a model or a saved folder (``hf_elsa.sparsity_report``, ``hf-elsa inspect``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .files import check_inside
from .formats import DEFAULT_FORMAT, detect_format
from .masks import read_masks
from .metadata import MASKS_NAME, ElsaSparsityConfig
from .state import converted_layers, get_sparsity


@dataclass
class TensorSparsity:
    """One tensor of a :class:`SparsityReport`."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    masked: bool = False
    dtype: str | None = None
    stored_bytes: int | None = None  # on disk: values (+ packed mask for compressed tensors)
    dense_bytes: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class SparsityReport:
    """Per-tensor and total sparsity of the prunable weights of a model or a saved folder.

    ``total_params`` counts every parameter (embeddings included), so ``overall_sparsity`` is the share of
    zeros in the whole model. ``str(report)`` is a readable table; ``to_dict()`` is JSON-ready.
    """

    tensors: list[TensorSparsity]
    total_params: int
    format: str | None = None
    source: str | None = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)

    @property
    def overall_sparsity(self) -> float:
        return self.zeros / max(self.total_params, 1)

    def __getitem__(self, name: str) -> TensorSparsity:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "sparsity": self.sparsity,
            "overall_sparsity": self.overall_sparsity,
            "numel": self.numel,
            "zeros": self.zeros,
            "total_params": self.total_params,
            "tensors": {
                t.name: {
                    "shape": list(t.shape),
                    "zeros": t.zeros,
                    "sparsity": t.sparsity,
                    "masked": t.masked,
                    "stored_bytes": t.stored_bytes,
                    "dense_bytes": t.dense_bytes,
                }
                for t in self.tensors
            },
        }

    def summary(self) -> str:
        """The totals: prunable tensors, whole model and, for a saved folder, bytes on disk."""
        kind = "pruned" if any(t.masked for t in self.tensors) else "prunable"
        lines = [
            (
                f"{kind} tensors: {len(self.tensors)}, {100 * self.sparsity:.2f}% sparse "
                f"({self.numel - self.zeros:,} of {self.numel:,} weights nonzero)"
            ),
            f"whole model: {100 * self.overall_sparsity:.2f}% of {self.total_params:,} parameters are zero",
        ]
        stored = [t for t in self.tensors if t.stored_bytes is not None and t.dense_bytes]
        if stored:
            s, d = sum(t.stored_bytes for t in stored), sum(t.dense_bytes for t in stored)
            lines.append(
                f"{kind} tensors on disk ({self.format}): {s / 1e6:,.2f} MB vs {d / 1e6:,.2f} MB dense ({s / d:.3f}x)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.tensors] + [20])
        lines = [f"{'tensor':<{width}}  {'shape':>14}  {'sparsity':>8}  {'nonzero':>12}"]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            lines.append(f"{t.name:<{width}}  {shape:>14}  {100 * t.sparsity:7.2f}%  {t.numel - t.zeros:>12,}")
        lines.append("-" * len(lines[0]))
        return "\n".join(lines) + "\n" + self.summary()


def sparsity_report(model_or_path: nn.Module | str | os.PathLike) -> SparsityReport:
    """Sparsity of every prunable weight of a model, or of a saved folder (any format).

    For a model: the tensors of its attached masks, or else every ``nn.Linear``/``Conv1D`` weight but the LM
    head. For a folder: read from the safetensors files without building the model.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return _folder_report(Path(model_or_path))
    return _model_report(model_or_path)


def _zeros(param) -> int:
    """Exact zeros of a weight; of the whole tensor for an FSDP2 shard (a collective: every process calls it)."""
    count = (param == 0).sum()
    return int(count.full_tensor() if hasattr(count, "full_tensor") else count)


def _model_report(model: nn.Module) -> SparsityReport:
    from ..targets import find_prunable_modules

    params = dict(model.named_parameters(remove_duplicate=False))
    converted = converted_layers(model)  # to_sparse_inference layers: counted from their CSR buffers
    state = get_sparsity(model)
    names = list(state.masks) if state else [f"{n}.weight" for n in find_prunable_modules(model)]
    names += [] if state else [n for n in converted if n not in names]
    tensors = []
    for n in names:
        if n in converted:
            layer = converted[n]
            shape = (layer.in_features, layer.out_features) if layer.conv1d else (layer.out_features, layer.in_features)
            tensors.append(TensorSparsity(n, shape, layer.stored_zeros(), state is not None, str(layer.values.dtype)))
        else:
            p = params[n]
            tensors.append(TensorSparsity(n, tuple(p.shape), _zeros(p), state is not None, str(p.dtype)))
    total = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in converted.values())
    return SparsityReport(tensors, total, format=None, source=type(model).__name__)


def report_from_config(config: ElsaSparsityConfig, model: nn.Module) -> SparsityReport:
    """The report of a save being written (from the per-tensor numbers ``measure`` just recorded)."""
    tensors = [TensorSparsity(k, tuple(v["shape"]), v["zeros"], masked=True) for k, v in config.tensors.items()]
    return SparsityReport(tensors, sum(p.numel() for p in model.parameters()), format=config.format)


def _folder_report(folder: Path) -> SparsityReport:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    check_inside(folder, sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")), folder)
    fmt = detect_format(folder)
    masks = {}
    if (folder / MASKS_NAME).is_file():
        shapes, shapes_source = fmt.weight_shapes(folder)  # checked before any mask is decoded
        masks = read_masks(folder / MASKS_NAME, weight_shapes=shapes, weights_source=shapes_source)

    def count(key: str, shape: tuple[int, ...]) -> bool:
        return key in masks or (not masks and _looks_prunable(key, shape))

    tensors, total = [], 0
    for st in fmt.stored_tensors(folder, masks, count):
        total += math.prod(st.shape)
        if st.zeros is not None:
            tensors.append(
                TensorSparsity(st.name, st.shape, st.zeros, st.name in masks, st.dtype, st.stored_bytes, st.dense_bytes)
            )
    label = "plain" if fmt.name == DEFAULT_FORMAT and not masks else fmt.name
    return SparsityReport(sorted(tensors, key=lambda t: _natural_key(t.name)), total, format=label, source=str(folder))


def _looks_prunable(key: str, shape: tuple[int, ...]) -> bool:
    """In a folder without masks: the 2-D weights that are not embeddings or the LM head."""
    return len(shape) == 2 and key.endswith(".weight") and not any(s in key for s in ("embed", "wte", "wpe", "lm_head"))


def _natural_key(name: str):
    """``layers.2`` before ``layers.10``; (kind, value) pairs so numbers and names never compare."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
