"""Attaching keep-masks to a model (and making its ``save_pretrained`` / ``push_to_hub`` sparse), detaching them,
and re-applying them to the weights."""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..projection import zero_pruned_
from ..version import __version__
from .hub import sparse_push_to_hub
from .masks import PackedMask
from .metadata import CONFIG_KEY, ElsaSparsityConfig
from .save import sparse_save_pretrained
from .state import SparsityState, converted_layers, get_sparsity, require_state


def _resolve_tensor_name(model: nn.Module, name: str, params: Mapping[str, torch.Tensor]) -> str:
    """``masks`` may be keyed by module ("...q_proj", as ``ElsaOptimizer.masks()``) or tensor name."""
    if name in params:
        return name
    if f"{name}.weight" in params:
        return f"{name}.weight"
    raise ValueError(
        f"attach_sparsity: mask {name!r} names no parameter or module of {type(model).__name__} "
        "(use module names such as 'model.layers.0.self_attn.q_proj' or tensor names ending in '.weight')."
    )


def attach_sparsity(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | ElsaSparsityConfig | None = None,
) -> SparsityState:
    """Record keep-masks and metadata on ``model`` and make its saves sparse checkpoints.

    Args:
        model: a ``transformers.PreTrainedModel`` (any ``nn.Module`` for :func:`sparsity_report` only).
        masks: ``{module or tensor name: bool keep-mask}`` (``trainer.elsa_optimizer.masks()``). None keeps
            the masks attached before and only updates the metadata.
        metadata: :class:`ElsaSparsityConfig` fields (method, sparsity, evaluation, ...); merged over the
            metadata attached before. Unknown keys are kept.

    After this, ``model.save_pretrained(dir, compressed=False|True, push_to_hub=..., ...)`` writes the
    checkpoint described in ``hf_elsa.sparse_io`` (``format=`` names any registered format) and
    ``model.push_to_hub(repo_id, compressed=...)`` uploads it. Every save checks that the weights are still
    zero where the masks prune them.
    """
    previous = get_sparsity(model)
    if masks is None:
        if previous is None:
            raise ValueError("attach_sparsity: masks=None needs masks attached before (pass the keep-masks).")
        packed = previous.masks
    else:
        if not masks:
            raise ValueError("attach_sparsity: masks is empty; pass {module_name: keep_mask} of the pruned weights.")
        params = dict(model.named_parameters(remove_duplicate=False))
        packed = {}
        for name, mask in masks.items():
            key = _resolve_tensor_name(model, name, params)
            if tuple(mask.shape) != tuple(params[key].shape):
                raise ValueError(
                    f"attach_sparsity: mask of {key!r} has shape {tuple(mask.shape)}, the weight {tuple(params[key].shape)}."
                )
            if mask.dtype != torch.bool:
                raise ValueError(f"attach_sparsity: mask of {key!r} has dtype {mask.dtype}; keep-masks are torch.bool.")
            packed[key] = PackedMask.pack(mask)
    config = ElsaSparsityConfig(hf_elsa_version=__version__)
    if previous is not None:
        config.update(previous.config)
    else:
        # a model that came from a sparse checkpoint carries the config.json entry: keep its facts
        entry = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if isinstance(entry, Mapping):
            config.update(
                {k: entry.get(k) for k in ("method", "sparsity", "sparsity_type", "target_modules", "exclude_modules")}
            )
    if masks is not None:  # measurements of an earlier save describe other masks
        config.tensors, config.files, config.achieved_sparsity, config.save_id = {}, {}, None, None
    config.update(metadata)
    if config.base_model is None:
        config.base_model = _hub_id_or_none(getattr(model, "name_or_path", None))
    state = SparsityState(masks=packed, config=config)
    model.elsa_sparsity = state
    _patch_methods(model)
    return state


def detach_sparsity(model: nn.Module) -> None:
    """Forget the masks: ``save_pretrained`` writes a plain dense folder again."""
    for name in ("elsa_sparsity", "save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every weight that the attached masks prune (e.g. after an update that densified them)."""
    state = require_state(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    converted = converted_layers(model)
    for key, packed in state.masks.items():
        if key in converted:  # a to_sparse_inference layer stores kept values only: zero those the mask prunes
            converted[key].apply_keep_mask(packed.unpack())
            continue
        if key not in params:
            raise ValueError(f"apply_masks: the masks cover {key!r} but the model has no such tensor.")
        zero_pruned_(params[key].data, packed.unpack(params[key].device))


def _hub_id_or_none(name: str | None) -> str | None:
    """``name_or_path`` when it looks like a Hub id (not a local folder)."""
    if not name or os.path.exists(name) or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    return name


# -- the sparse save_pretrained / push_to_hub, bound to the instance --------------------------------


def _patch_methods(model: nn.Module) -> None:
    """Bind the sparse ``save_pretrained`` / ``push_to_hub`` to this instance (not its class)."""
    if not hasattr(type(model), "save_pretrained"):
        return  # a bare nn.Module: masks are recorded for sparsity_report, nothing to save
    model.save_pretrained = SparseMethod(model, "save_pretrained")
    model.push_to_hub = SparseMethod(model, "push_to_hub")


class SparseMethod:
    """``model.save_pretrained`` / ``model.push_to_hub`` of an attached model: a bound method that pickles.

    Why not ``types.MethodType``: a bound method in the instance ``__dict__`` pickles as ``getattr(model,
    func.__name__)``, which names a function the class does not have (``sparse_push_to_hub``), so ``torch.load`` of
    a pickled model failed; and one that unpickled would have been the class's dense ``save_pretrained``. This
    object pickles and deep-copies as ``(model, method name)`` (the copy's methods are bound to the copy) and finds
    the function from the model's class when called.
    """

    def __init__(self, model: nn.Module, name: str):
        self.__self__ = model
        self.name = name

    @property
    def __func__(self):
        return _wrapper_for(type(self.__self__)) if self.name == "save_pretrained" else sparse_push_to_hub

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]  # help(model.save_pretrained) shows the function's doc
        return self.__func__.__doc__

    @property
    def __name__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<hf_elsa sparse {self.name} of {type(self.__self__).__name__}>"


_WRAPPERS: dict[type, Any] = {}


def _wrapper_for(cls: type):
    """A ``save_pretrained`` with ``cls.save_pretrained``'s signature plus ``compressed`` and ``format``
    (cached per class)."""
    if cls in _WRAPPERS:
        return _WRAPPERS[cls]
    original = inspect.signature(cls.save_pretrained)
    parameters = list(original.parameters.values())
    var_kw = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]

    def save_pretrained(self, save_directory, *args, compressed: bool = False, format: str | None = None, **kwargs):
        # the original's arguments by name, its **kwargs flattened (repo_id, commit_message, ...)
        params = dict(original.bind(self, save_directory, *args, **kwargs).arguments)
        params.pop(parameters[0].name)
        for p in var_kw:
            params.update(params.pop(p.name, {}))
        return sparse_save_pretrained(self, cls, compressed=compressed, format=format, **params)

    rest = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter("compressed", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
        inspect.Parameter("format", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"),
    ]
    save_pretrained.__signature__ = original.replace(parameters=rest + added + var_kw)
    save_pretrained.__doc__ = (
        "hf_elsa sparse save (see hf_elsa.sparse_io): the standard folder plus masks, metadata and model card;\n"
        "compressed=True stores pruned tensors as kept values + bitmask (read it with hf_elsa.load_sparse_model);\n"
        "format= names any registered save format (hf_elsa.sparse_io.formats).\n\n"
        + (cls.save_pretrained.__doc__ or "")
    )
    save_pretrained.__name__ = save_pretrained.__qualname__ = "save_pretrained"
    _WRAPPERS[cls] = save_pretrained
    return save_pretrained


# keys of Trainer.evaluate() metrics that describe the run, not the model
_NOT_RESULTS = ("_runtime", "_samples_per_second", "_steps_per_second", "epoch", "total_flos")


def record_evaluation(
    model: nn.Module, metrics: Mapping[str, Any], protocol: Mapping[str, Any] | str | None = None
) -> dict[str, Any]:
    """Record evaluation results on an attached model: the next save writes them into ``elsa_config.json`` and into
    the model card (a results table and ``model-index`` entries on the Hub).

    Args:
        metrics: ``{name: value}``, e.g. ``trainer.evaluate()``: timing entries (``eval_runtime``, ...) and
            ``epoch`` are dropped, an ``eval_``/``test_`` prefix is stripped (``eval_perplexity`` -> ``perplexity``).
        protocol: how the numbers were measured, so they can be reproduced: a sentence, or a mapping such as
            ``{"dataset": "wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test", "seqlen": 512,
            "description": "token perplexity, non-overlapping windows"}`` (``dataset``, ``dataset_name``,
            ``dataset_config``, ``split`` and ``revision`` fill the model-index entry; other keys are listed).

    Returns the recorded ``{"protocol": ..., "results": ...}``; raises ``ValueError`` when no masks are attached.
    """
    state = require_state(model)
    results = {}
    for name, value in metrics.items():
        if name.endswith(_NOT_RESULTS) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for prefix in ("eval_", "test_"):
            name = name.removeprefix(prefix)
        results[name] = value
    if not results:
        raise ValueError(f"record_evaluation: no numeric results in {sorted(metrics)}.")
    evaluation = {"protocol": protocol, "results": results}
    state.config.update({"evaluation": evaluation}, source="record_evaluation")
    return state.config.evaluation
