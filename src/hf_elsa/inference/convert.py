"""Sparse inference: pruned Linears become CSR layers with a measured kernel choice, and back.

:func:`to_sparse_inference` replaces each pruned ``nn.Linear`` of a model by a :class:`SparseLinear`
holding only the kept weights (values, int16 or int32 column indices, int32 row pointers) whenever one of the
registered kernels (``kernels.py``) is faster than the dense matmul *for that layer*, measured on this
machine at the token counts that matter (decode batch sizes and a prefill length). Layers where no kernel
wins keep their dense weight, so the model is never slower than dense at the measured sizes.
:func:`from_sparse_inference` puts bit-identical ``nn.Linear`` layers back.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._messages import shorten
from ..projection import zero_pruned_
from ..targets import PRUNABLE_TYPES, is_transposed
from . import densify, native, scipy_csr, semi_structured, torch_csr  # noqa: F401  (register the kernels)
from .kernels import KERNELS, Kernel

REPORT_ATTR = "hf_elsa_inference"


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as CSR; the kernel is picked per call from the token count.

    Buffers: ``values`` (kept weights, model dtype), ``col_indices`` (int16 up to
    32768 input features, else int32),
    ``crow_indices`` (int32, ``out_features + 1``); ``bias`` stays a parameter. ``plan`` maps measured
    token counts to kernel names; a call with ``n`` tokens uses the entry nearest to ``n`` (log scale).
    Inference only (no gradient reaches the values).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        values: torch.Tensor,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        bias: torch.Tensor | None = None,
        plan: Sequence[tuple[int, str]] = (),
        conv1d: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.conv1d = conv1d  # replaces a GPT-2 Conv1D: its state dict weight is (in, out)
        # not in the state dict, which holds the dense layout (see _save_to_state_dict)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("crow_indices", crow_indices, persistent=False)
        self.register_buffer("col_indices", col_indices, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=bias.requires_grad) if bias is not None else None
        self._kernels: dict[str, Kernel] = {}
        self._by_tokens: dict[int, Kernel] = {}
        self.set_plan(plan)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, plan: Sequence[tuple[int, str]] = (), index_dtype: torch.dtype | None = None
    ) -> SparseLinear:
        """CSR copy of an ``nn.Linear`` (or GPT-2 ``Conv1D``); column indices int16 when ``in_features <= 32768``
        (default), else int32."""
        conv1d = is_transposed(linear)
        if conv1d:
            linear = _as_linear(linear)
        weight = linear.weight.detach()
        if index_dtype is None:
            index_dtype = torch.int16 if linear.in_features <= 2**15 else torch.int32
        if index_dtype not in (torch.int16, torch.int32) or (index_dtype == torch.int16 and linear.in_features > 2**15):
            raise ValueError(f"index_dtype {index_dtype} cannot index {linear.in_features} input features")
        values, crow, col = _csr(weight, index_dtype)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, values, crow, col, bias, plan, conv1d)

    # -- plan and kernels ---------------------------------------------------------------------------
    def set_plan(self, plan: Sequence[tuple[int, str]]) -> None:
        for _, name in plan:
            if name not in KERNELS:
                raise ValueError(f"unknown kernel {name!r}; registered: {sorted(KERNELS)}")
        self.plan = sorted((int(n), name) for n, name in plan)
        self._by_tokens = {}
        # a call of t tokens uses the plan entry nearest in log scale: cut at the geometric means
        sizes = [n for n, _ in self.plan]
        self._cuts = [math.sqrt(a * b) for a, b in itertools.pairwise(sizes)]

    def kernel(self, name: str) -> Kernel:
        """The bound kernel that serves plan entry ``name``: ``name`` itself, or, when it cannot run for the
        buffers' current dtype or device (after ``.half()``, ``.double()``, ``.to(device)``), a kernel that can."""
        if name not in self._kernels:
            kernel = KERNELS[_runnable_kernel(self, name)]()
            kernel.bind(self)
            self._kernels[name] = kernel
        return self._kernels[name]

    def kernel_for(self, tokens: int) -> str:
        if not self.plan:
            raise RuntimeError("SparseLinear has no kernel plan; build it with to_sparse_inference")
        return self.plan[bisect.bisect_left(self._cuts, tokens)][1]

    def __getstate__(self):  # copies and pickles rebuild the kernels' views of their own buffers
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_kernels"], state["_by_tokens"] = {}, {}
        return state

    def _apply(self, fn, recurse=True):  # .to() / .cuda() move the buffers: views must be rebuilt
        self._kernels, self._by_tokens = {}, {}
        return super()._apply(fn, recurse)

    # The state dict has nn.Linear's layout (``weight`` with its zeros, ``bias``): save_pretrained, push_to_hub,
    # the sparse save and load_state_dict of the original architecture see what they expect, and a saved
    # converted model is the dense-zero model it computes. Saving materialises the dense weights.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.dense_weight()
        destination[prefix + "weight"] = weight.T.contiguous() if self.conv1d else weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key].T if self.conv1d else state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                expected = (self.out_features, self.in_features)[:: -1 if self.conv1d else 1]
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, the layer "
                    f"has {expected}"
                )
            else:  # the kept weights may differ in number and place: new buffers, kernels rebuilt on next call
                csr = _csr(weight.detach().to(self.values.device, self.values.dtype), self.col_indices.dtype)
                self.values, self.crow_indices, self.col_indices = csr
                self._kernels, self._by_tokens = {}, {}
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- compute ------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_keep_mask(self, keep: torch.Tensor) -> None:
        """Zero the stored values where ``keep`` (the dense layer's ``(out, in)`` keep-mask, or ``(in, out)`` for a
        GPT-2 ``Conv1D``) prunes: what :func:`~hf_elsa.sparse_io.apply_masks` does to a dense weight."""
        keep = keep.T if self.conv1d else keep
        if tuple(keep.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"keep-mask of shape {tuple(keep.shape)} for a {self.out_features}x{self.in_features} layer"
            )
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device),
            (self.crow_indices[1:] - self.crow_indices[:-1]).long(),
        )
        kept = keep.to(self.values.device)[rows, self.col_indices.long()]
        zero_pruned_(self.values.data, kept)

    def stored_zeros(self) -> int:
        """Zeros of the dense weight this layer computes with (not stored, or stored as 0)."""
        return self.in_features * self.out_features - int(self.values.count_nonzero())

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight rebuilt from the buffers (exact, zeros where nothing is stored)."""
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device),
            (self.crow_indices[1:] - self.crow_indices[:-1]).long(),
        )
        weight[rows, self.col_indices.long()] = self.values
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.requires_grad:
            x2 = x2.detach()  # inference only: no gradient to the input
        if x2.dtype != self.values.dtype:
            x2 = x2.to(self.values.dtype)
        tokens = x2.shape[0]
        kernel = self._by_tokens.get(tokens)
        if kernel is None:  # first call with this many tokens (a decode step is always the same few)
            kernel = self._by_tokens[tokens] = self.kernel(self.kernel_for(tokens))
        y = kernel(self, x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes of the stored weight (values and indices; bias excluded) and of the kernels' own copies."""
        own = sum(t.numel() * t.element_size() for t in (self.values, self.crow_indices, self.col_indices))
        return own + sum(k.extra_nbytes() for k in self._kernels.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / max(self.in_features * self.out_features, 1)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{n}:{name}" for n, name in self.plan)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.sparsity:.3f}, bias={self.bias is not None}, plan=[{plan}]"
        )


def _runnable_kernel(module: SparseLinear, name: str) -> str:
    """``name`` if that kernel runs on ``module``'s buffers as they are now, else the kernel that replaces it.

    A plan is measured for the dtype and device at conversion; a later ``.to()`` can leave a kernel that cannot
    read the new buffers (the C kernel reads fp32/bf16 bytes only). Replacements, in order: the other kernels of
    the plan, the other registered kernels, ``densify`` (any dtype and device). Said once, with how to re-measure.
    """
    dtype, device = module.values.dtype, module.values.device

    def runs(kernel: str) -> tuple[bool, str]:
        ok, why = KERNELS[kernel].available(dtype, device)
        return KERNELS[kernel].accepts(module) if ok else (ok, why)

    ok, why = runs(name)
    if ok:
        return name
    order = [k for _, k in module.plan] + [k for k in KERNELS if k != "densify"] + ["densify"]
    other = next(k for k in dict.fromkeys(order) if k != name and runs(k)[0])
    warnings.warn(
        f"SparseLinear: kernel {name!r} cannot run for {dtype} on {device} ({why}); using {other!r} instead. "
        "Call hf_elsa.to_sparse_inference(model) again after a dtype or device change to measure the kernels anew.",
        UserWarning,
        stacklevel=4,
    )
    return other


def _csr(weight: torch.Tensor, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, crow_indices int32, col_indices index_dtype)`` of the non-zeros of a 2-D weight."""
    # -0.0 (what masking by multiplication leaves) counts as zero: it comes back as +0.0
    stored = weight.ne(0)
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int32, device=weight.device)
    torch.cumsum(stored.sum(dim=1, dtype=torch.int32), 0, out=crow[1:])
    return weight[stored].clone(), crow, stored.nonzero()[:, 1].to(index_dtype)


# -- the report -------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """What the conversion measured and decided for one Linear."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    converted: bool
    plan: list[tuple[int, str]]
    dense_ms: dict[int, float]  # token count -> median time of the dense matmul
    best_ms: dict[int, float]  # token count -> median time of the chosen sparse kernel
    dense_nbytes: int
    nbytes: int  # bytes of the weight as the layer now stores it
    reason: str = ""
    speedup: dict[int, float] = field(default_factory=dict)  # token count -> dense / best kernel (median ratio)


@dataclass
class InferenceReport:
    """Attached to the model as ``model.hf_elsa_inference`` by :func:`to_sparse_inference`."""

    layers: dict[str, LayerChoice] = field(default_factory=dict)
    tokens: tuple[int, ...] = ()
    prefill_tokens: int | None = None
    kernels: dict[str, str] = field(default_factory=dict)  # name -> "" (used) or why it was not available

    @property
    def dense_nbytes(self) -> int:
        return sum(c.dense_nbytes for c in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())

    def summary(self) -> str:
        converted = [c for c in self.layers.values() if c.converted]
        lines = [
            (
                f"{len(converted)} of {len(self.layers)} pruned Linears converted; weight memory of the pruned "
                f"Linears {self.nbytes / 2**20:.1f} MiB (dense {self.dense_nbytes / 2**20:.1f} MiB, "
                f"{self.nbytes / max(self.dense_nbytes, 1):.3f}x)"
            ),
        ]
        usage: dict[str, int] = {}
        for c in converted:
            for n, name in c.plan:
                usage[f"{n} tok: {name}"] = usage.get(f"{n} tok: {name}", 0) + 1
        lines += [f"  {key}: {count} layers" for key, count in sorted(usage.items())]
        kept = [c for c in self.layers.values() if not c.converted]
        if kept:
            lines.append(f"  kept dense: {len(kept)} ({kept[0].reason}{', ...' if len(kept) > 1 else ''})")
        unavailable = {k: why for k, why in self.kernels.items() if why}
        lines += [f"  kernel {k} not used: {why}" for k, why in unavailable.items()]
        return "\n".join(lines)


# -- conversion -------------------------------------------------------------------------------------


def _as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` sharing a GPT-2 ``Conv1D``'s storage (its weight is the transposed view): timed and
    converted like any Linear."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().T, requires_grad=False)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def _candidates(model: nn.Module, modules: Iterable[str] | None) -> list[tuple[str, nn.Linear]]:
    """The pruned Linears (GPT-2 ``Conv1D`` as Linear views): those named by attached masks, else every
    Linear with an exact zero (LM head excluded)."""
    from ..sparse_io import get_sparsity

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = dict(model.named_modules())
    if modules is not None:
        names = list(modules)
        for name in names:
            if name not in named:
                raise ValueError(f"to_sparse_inference: the model has no module {name!r}")
            if not isinstance(named[name], nn.Linear):
                raise TypeError(f"to_sparse_inference: {name!r} is a {type(named[name]).__name__}, not an nn.Linear")
    else:
        state = get_sparsity(model)
        if state is not None:
            names = [key[: -len(".weight")] for key in state.masks if key.endswith(".weight")]
            names = [n for n in names if isinstance(named.get(n), PRUNABLE_TYPES)]
        else:
            names = [
                n
                for n, m in named.items()
                if isinstance(m, PRUNABLE_TYPES) and m is not head and bool(m.weight.detach().eq(0).any())
            ]
    # a weight shared with another module (tied) stays dense: replacing one side would untie it
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    kept = [n for n in names if named[n] is not head and owners.get(id(named[n].weight), 0) == 1]
    return [(n, _as_linear(named[n]) if is_transposed(named[n]) else named[n]) for n in kept]


def _time_layers(fns, layers, repeats: int, sync) -> dict[str, list[float]]:
    """Per layer and fn: the median time, and the median over passes of its ratio to the first fn's time.

    One pass runs the layers in model order, so each layer's weights come from memory as in a forward
    pass, and runs every fn on a layer back to back, so that a burst of load from elsewhere on the
    machine hits the dense matmul and the kernels alike; the per-pass ratios cancel slower drifts.
    The first pass is a warm-up.
    """
    names = list(fns)
    samples = {name: [[] for _ in layers] for name in names}
    for rep in range(repeats + 1):
        order = names if rep % 2 else names[::-1]  # alternate which fn runs first on a layer
        for i, layer in enumerate(layers):
            for name in order:
                sync()
                start = time.perf_counter()
                fns[name](layer)
                sync()
                if rep:
                    samples[name][i].append(time.perf_counter() - start)
    base = names[0]
    times = {name: [statistics.median(s) for s in per_layer] for name, per_layer in samples.items()}
    ratios = {
        name: [
            statistics.median(a / max(b, 1e-12) for a, b in zip(samples[name][i], samples[base][i]))
            for i in range(len(layers))
        ]
        for name in names
    }
    return {"times": times, "ratios": ratios}


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module,
    *,
    tokens: Sequence[int] = (1, 8),
    prefill_tokens: int | None = 128,
    kernels: Sequence[str] | None = None,
    min_speedup: float = 1.1,
    prefill_min_speedup: float | None = 1.1,
    repeats: int = 5,
    modules: Iterable[str] | None = None,
    index_dtype: torch.dtype | None = None,
    force: bool = False,
    verbose: bool = False,
) -> nn.Module:
    """Replace each pruned ``nn.Linear`` of ``model`` by a :class:`SparseLinear` where that is faster.

    Args:
        model: a sparse model (from ``ElsaTrainer``, ``load_sparse_model``, a one-shot pruner, or any model
            whose pruned weights are exact zeros). Converted in place and returned.
        tokens: token counts per call that decide (decode batch sizes): a layer is converted only if, at
            every one of them, its fastest sparse kernel beats the dense matmul by ``min_speedup``.
        prefill_tokens: a prompt length also measured, to pick the kernel for long calls (a dense rebuild
            of the weight, ``densify``, is among the candidates).
        kernels: names from ``hf_elsa.inference.KERNELS`` to consider (default: all that run here).
            Naming only kernels that cannot run here raises ``ValueError`` with the reasons.
        min_speedup: required speed-up of the sparse kernel over dense at each of ``tokens`` (1.1: a
            10% margin over timing noise, so that a converted layer is not slower than dense).
        prefill_min_speedup: the same requirement at ``prefill_tokens`` (default 1.1, the same margin: a
            converted layer does not prefill slower than dense). None lets prefill be slower for the sake of decode (at
            50-70% sparsity on one core that trades a slower prompt for faster tokens).
        repeats: timed passes per size (medians of the per-pass kernel/dense time ratios; one more
            warm-up pass). Each pass runs the layers in model order and, on each layer, dense and every
            kernel back to back.
        modules: Linear names to consider instead of the pruned ones found automatically.
        index_dtype: ``torch.int16`` or ``torch.int32`` column indices; default int16 where the layer has
            at most 32768 inputs (6 bytes per kept fp32 weight instead of 8). Kernels that need int32
            (``torch_csr``, ``scipy_csr``) widen them per call rather than keeping a second copy.
        force: convert every candidate layer with the first usable kernel of ``kernels`` without
            measuring (tests, or a plan known to be right).
        verbose: print :meth:`InferenceReport.summary`.

    The dense weights of converted layers are freed; :func:`from_sparse_inference` rebuilds them (equal values;
    a -0.0 comes back as +0.0).
    The decisions are in ``model.hf_elsa_inference`` (:class:`InferenceReport`).
    """
    _check_measurement(tokens, prefill_tokens, min_speedup, prefill_min_speedup, repeats)
    candidates = _candidates(model, modules)
    report = InferenceReport(tokens=tuple(tokens), prefill_tokens=prefill_tokens)
    previous = getattr(model, REPORT_ATTR, None)
    if isinstance(previous, InferenceReport):  # a second call measures what is left: keep the layers converted before
        converted = sparse_layers(model)
        report.layers = {name: c for name, c in previous.layers.items() if name in converted}
        report.kernels = dict(previous.kernels)
    setattr(model, REPORT_ATTR, report)
    if not candidates:
        return model
    first = candidates[0][1].weight
    dtype, device = first.dtype, first.device
    names = list(KERNELS) if kernels is None else list(kernels)
    for name in names:
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; registered: {sorted(KERNELS)}")
    usable = []
    for name in names:
        ok, why = KERNELS[name].available(dtype, device)
        report.kernels[name] = why
        if ok:
            usable.append(name)
    if not usable:
        if kernels is not None:
            reasons = "; ".join(f"{k}: {report.kernels[k]}" for k in names)
            raise ValueError(
                f"to_sparse_inference: none of the kernels {names} runs for {dtype} on {device} "
                f"({reasons}). Leave kernels=None to use whatever runs here."
            )
        return model

    # from the model's own module (a Conv1D is remembered as one), not the Linear view used for timing
    sparse = {
        name: SparseLinear.from_linear(model.get_submodule(name), index_dtype=index_dtype) for name, _ in candidates
    }
    accepts = {(lname, k): KERNELS[k].accepts(sparse[lname]) for lname, _ in candidates for k in usable}
    sizes = sorted(set(tokens) | ({prefill_tokens} if prefill_tokens else set()))
    timings: dict[int, dict[str, list[float]]] = {}
    if not force:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for n in sizes:
            inputs = {}
            for _, linear in candidates:
                if linear.in_features not in inputs:
                    inputs[linear.in_features] = torch.randn(n, linear.in_features, dtype=dtype, device=device)
            fns = {
                "dense": lambda i, inputs=inputs: F.linear(
                    inputs[candidates[i][1].in_features], candidates[i][1].weight
                )
            }
            for k in usable:

                def run(i, k=k, inputs=inputs):
                    lname, linear = candidates[i]
                    if accepts[(lname, k)][0]:
                        sparse[lname].kernel(k)(sparse[lname], inputs[linear.in_features])

                fns[k] = run
            timings[n] = _time_layers(fns, list(range(len(candidates))), repeats, sync)

    for i, (lname, linear) in enumerate(candidates):
        layer = sparse[lname]
        ok_kernels = [k for k in usable if accepts[(lname, k)][0]]
        dense_nbytes = linear.weight.numel() * linear.weight.element_size()
        choice = LayerChoice(
            lname,
            (linear.out_features, linear.in_features),
            layer.sparsity,
            False,
            [],
            {},
            {},
            dense_nbytes,
            dense_nbytes,
        )
        if not ok_kernels:
            choice.reason = "; ".join(f"{k}: {accepts[(lname, k)][1]}" for k in usable)
        elif force:
            choice.converted = True
            choice.plan = [(n, ok_kernels[0]) for n in sizes]
        else:
            plan, speedup = [], {}
            for n in sizes:
                ratios = timings[n]["ratios"]  # kernel time / dense time, median over passes
                best = min(ok_kernels, key=lambda k: ratios[k][i])
                plan.append((n, best))
                speedup[n] = 1.0 / max(ratios[best][i], 1e-12)
                choice.dense_ms[n] = timings[n]["times"]["dense"][i] * 1e3
                choice.best_ms[n] = timings[n]["times"][best][i] * 1e3
            required = {n: min_speedup for n in tokens}
            if prefill_tokens and prefill_min_speedup is not None and prefill_tokens not in required:
                required[prefill_tokens] = prefill_min_speedup
            slower = [n for n, need in required.items() if speedup[n] < need]
            choice.plan, choice.speedup = plan, speedup
            choice.converted = not slower
            if slower:
                choice.reason = "no kernel fast enough at " + ", ".join(
                    f"{n} tokens ({speedup[n]:.2f}x < {required[n]}x)" for n in slower
                )
        if choice.converted:
            layer.set_plan(choice.plan)
            layer._kernels = {k: v for k, v in layer._kernels.items() if k in {n for _, n in choice.plan}}
            layer._by_tokens = {}
            _replace(model, lname, layer)
            choice.nbytes = layer.nbytes()
        report.layers[lname] = choice
    if verbose:
        print(report.summary())
    return model


def _check_measurement(tokens, prefill_tokens, min_speedup, prefill_min_speedup, repeats) -> None:
    """Refuse measurement settings that cannot decide anything, before any timing (a NaN threshold compares False
    and converted every layer; ``repeats=0`` ended in ``statistics.StatisticsError``)."""

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def finite_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    if not positive_int(repeats):
        raise ValueError(f"to_sparse_inference: repeats must be a positive int (timed passes), got {shorten(repeats)}.")
    if isinstance(tokens, (str, bytes)) or not tokens or not all(positive_int(n) for n in tokens):
        raise ValueError(
            "to_sparse_inference: tokens must be a non-empty list of positive ints (tokens per call), "
            f"got {shorten(tokens)}."
        )
    if prefill_tokens is not None and not positive_int(prefill_tokens):
        raise ValueError(
            f"to_sparse_inference: prefill_tokens must be a positive int or None, got {shorten(prefill_tokens)}."
        )
    for name, value in (("min_speedup", min_speedup), ("prefill_min_speedup", prefill_min_speedup)):
        if not (value is None and name == "prefill_min_speedup") and not finite_number(value):
            raise ValueError(
                f"to_sparse_inference: {name} must be a finite number >= 0 (1.1 = 10% faster than dense, "
                f"0 = any speed), got {shorten(value)}."
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def from_sparse_inference(model: nn.Module) -> nn.Module:
    """Undo :func:`to_sparse_inference`: every :class:`SparseLinear` becomes an ``nn.Linear`` with the
    same dense weight (every stored value bit for bit; zeros, including a former -0.0, as +0.0). In place;
    returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            weight = module.dense_weight()
            if module.conv1d:
                with torch.device("meta"):
                    linear = Conv1D(module.out_features, module.in_features)
                linear.weight = nn.Parameter(weight.T.contiguous())
            else:
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
                linear.weight = nn.Parameter(weight)
            if module.bias is not None:
                linear.bias = module.bias
            _replace(model, name, linear)
    if hasattr(model, REPORT_ATTR):
        delattr(model, REPORT_ATTR)
    return model


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
