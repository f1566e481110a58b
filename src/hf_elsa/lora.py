"""LoRA (PEFT) on a sparse model: train adapters, then merge them without losing a single zero.

A LoRA adapter adds ``delta = scale * B @ A`` to a frozen weight ``W``. ``W`` keeps its zeros while the
adapter trains, but ``delta`` is dense: ``peft``'s own ``merge_and_unload`` writes ``W + delta`` and every
pruned entry becomes nonzero (then hf_elsa refuses to save the model as sparse). :func:`merge_and_unload`
merges and re-applies the keep-masks, so the merged model has exactly the mask it had before the adapters,
and records the fine-tuning in its sparsity metadata, so it saves as a sparse checkpoint.

The price: the part of ``delta`` on pruned entries is dropped. At 70% sparsity about 70% of the entries of
``delta`` fall on pruned weights; how much of its norm they carry is measured at every merge (the
``adapter_delta_norm_dropped`` entry of the metadata, and a log line) -- docs/checkpoints.md has numbers.

``ElsaTrainer`` accepts a ``peft.PeftModel`` (or ``peft_config=`` with a plain model, as TRL does): the
adapters train, the frozen base weights are not touched, no ADMM runs (keep-mask mode), and
:func:`merge_and_unload` re-applies the masks afterwards. ``pip install "hf_elsa[peft]"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._logging import get_logger
from .projection import zero_pruned_
from .sparse_io import attach_sparsity, get_sparsity
from .sparse_io.metadata import TRAINING_HYPERPARAMETERS  # what a keep-mask run records, here for LoRA
from .targets import PRUNABLE_TYPES

logger = get_logger(__name__)

PEFT_INSTALL = 'pip install "hf_elsa[peft]"  (or: pip install peft)'


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"LoRA fine-tuning needs peft: {PEFT_INSTALL}.") from exc
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def has_injected_adapters(model: nn.Module) -> bool:
    """Adapter layers inside a model that is not a ``PeftModel`` (``model.add_adapter(config)``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return not is_peft_model(model) and any(isinstance(m, BaseTunerLayer) for m in model.modules())


def apply_peft_config(model: nn.Module, peft_config):
    """``peft.get_peft_model(model, peft_config)``, as TRL does for ``peft_config=``."""
    if is_peft_model(model):
        raise ValueError("ElsaTrainer got a PeftModel and peft_config=: pass one or the other.")
    return _peft().get_peft_model(model, peft_config)


def base_layers(peft_model) -> dict[str, nn.Module]:
    """``{name in the base model without adapters: nn.Linear/Conv1D}`` of every candidate weight.

    An adapted layer is found under its original name (``model.layers.0.self_attn.q_proj``) and stands for
    its base layer; the adapters' own layers (``lora_A``, ``lora_B``, ...) are not candidates.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    layers: dict[str, nn.Module] = {}
    inside: list[str] = []  # prefixes of adapted layers: their submodules are adapter parts
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name)
            module = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):  # modules_to_save: the trainable copy replaces the layer
            inside.append(name)
            module = _trained_copy(module)
        if isinstance(module, PRUNABLE_TYPES) and module is not head:
            layers[name] = module
    return layers


def _trained_copy(wrapper) -> nn.Module:
    """The copy of a ``modules_to_save`` layer that the active adapter trains (what the merge keeps)."""
    active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
    return wrapper.modules_to_save[active[0]] if active else wrapper.original_module


# Below this share of exact zeros in its Linear weights, a base without attached masks is a dense model whose few
# zeros are chance (rounding, an init): keeping them as "the mask" would save a dense model as a sparse checkpoint.
MIN_IMPLIED_SPARSITY = 0.01


def keep_masks(peft_model) -> dict[str, torch.Tensor]:
    """``{original tensor name: keep-mask}``: the masks attached to the base model (``load_sparse_model``,
    ``ElsaTrainer``), else the zeros of the frozen base weights (``weight != 0``) of the layers that have any."""
    base = peft_model.get_base_model()
    layers = base_layers(peft_model)
    state = get_sparsity(base)
    if state is not None:
        return {name: state.mask(name) for name in state.masks}
    masks = {}
    for name, module in layers.items():
        weight = module.weight.detach()
        if bool((weight == 0).any()):
            masks[f"{name}.weight"] = (weight != 0).cpu()
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.weight.numel() for m in layers.values())
    if masks and zeros < MIN_IMPLIED_SPARSITY * total:
        raise ValueError(
            f"the PEFT model's base has no masks attached and only {zeros:,} exact zeros ({100 * zeros / total:.3g}% "
            f"of its {total:,} Linear weights): it is not a pruned model, and keeping those zeros as a mask would save "
            "a dense model as a sparse one. Prune it first (ElsaTrainer, a one-shot pruner) or load a sparse "
            "checkpoint with hf_elsa.load_sparse_model; for a dense model use the PeftModel's own merge_and_unload()."
        )
    return masks


@dataclass
class LoraKeepMask:
    """What ``ElsaTrainer`` knows about a PEFT model: the masked base layers (by original module name)."""

    modules: dict[str, nn.Module]
    sparsity: float


def prepare_peft_model(peft_model, args) -> LoraKeepMask:
    """Check a PEFT model for keep-mask LoRA fine-tuning and record the run's settings on its base model."""
    masks = keep_masks(peft_model)
    if not masks:
        raise ValueError(
            "ElsaTrainer got a PEFT model whose base weights have no zeros: LoRA fine-tuning keeps the mask of an "
            "already pruned model. Prune it first (ElsaTrainer without adapters, or hf_elsa.load_sparse_model), "
            "then add the adapters."
        )
    layers = base_layers(peft_model)
    modules = {}
    for tensor in masks:
        name = tensor.removesuffix(".weight")
        if name not in layers:
            raise ValueError(f"the masks name {tensor!r}, which is not a Linear weight of the PEFT model's base.")
        if layers[name].weight.requires_grad:
            raise ValueError(
                f"{tensor} is trainable in the PEFT model: a sparse base must stay frozen under the adapters "
                "(drop it from modules_to_save / do not unfreeze it), or train without adapters with "
                "ElsaConfig(keep_mask=True)."
            )
        modules[name] = layers[name]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    base = peft_model.get_base_model()
    training = {key: getattr(args, key, None) for key in TRAINING_HYPERPARAMETERS}
    training = {key: getattr(value, "value", value) for key, value in training.items()}
    if (training.get("max_steps") or -1) > 0:
        training.pop("num_train_epochs")
    base.elsa_lora_training = training  # read by merge_and_unload
    return LoraKeepMask(modules, 1 - kept / max(total, 1))


def _merged_adapters(peft_model, adapter_names) -> list[str]:
    """The adapters a merge folds in: ``adapter_names``, else the active ones (PEFT's rule)."""
    if adapter_names is not None:
        return list(adapter_names)
    active = getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")]
    return [active] if isinstance(active, str) else list(active)


def _adapter_description(peft_model, names: list[str]) -> dict:
    """What the metadata says about the merged adapters: kind (``lora``, ``dora``, ``loha``, ...), rank, targets.

    One adapter: its fields; several: the first one's fields and ``adapter_names`` (every merge lists them).
    """
    configs = [peft_model.peft_config[n] for n in names if n in peft_model.peft_config]
    if not configs:
        return {"adapter": "peft", "adapter_names": names}
    descriptions = []
    for config in configs:
        kind = str(getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__).lower()
        description = {"adapter": "dora" if getattr(config, "use_dora", False) else kind}
        for key in ("r", "lora_alpha", "alpha", "lora_dropout", "target_modules", "use_dora", "modules_to_save"):
            value = getattr(config, key, None)
            if value is not None and value is not False:
                description[key] = sorted(value) if isinstance(value, set) else value
        descriptions.append(description)
    first = dict(descriptions[0])
    if len(descriptions) > 1:
        first["adapter"] = "+".join(d["adapter"] for d in descriptions)
    first["adapter_names"] = names
    return first


@torch.no_grad()
def _merge_layers_keeping_masks(peft_model, masks: dict[str, torch.Tensor], names: list[str], safe_merge: bool):
    """Merge ``names`` into every adapted layer, one layer at a time, and re-apply its keep-mask right after.

    Returns the share of the merged change's norm that fell on pruned entries (None when nothing changed). The
    change is measured as merged minus base weight, so it is exact for any adapter (LoRA, DoRA's rescaling,
    LoHa, LoKr, ...), not only for LoRA's ``B @ A``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    total = dropped = 0.0
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        keep = masks.get(f"{name}.weight")
        weight = module.get_base_layer().weight
        before = weight.detach().float().clone() if keep is not None else None
        module.merge(safe_merge=safe_merge, adapter_names=names)
        if keep is None:
            continue
        keep = keep.to(weight.device)
        change = weight.detach().float() - before
        total += float(change.pow(2).sum())
        dropped += float(change.masked_fill(keep, 0).pow(2).sum())
        zero_pruned_(weight.data, keep)
    return math.sqrt(dropped / total) if total > 0 else None


def merge_and_unload(peft_model, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
    """Merge the adapters of a PEFT model into its sparse base and re-apply the masks.

    Returns the base model (a ``transformers`` model, no adapters) with exactly the base's zeros: the same
    keep-masks (those attached to the base, else its zeros before the merge), attached with the fine-tuning
    recorded, so ``save_pretrained(dir, compressed=...)`` writes a sparse checkpoint. The part of the merged
    adapter delta on pruned entries is dropped; its share of the delta's norm is logged and stored as
    ``fine_tuning["adapter_delta_norm_dropped"]``. The other arguments are ``PeftModel.merge_and_unload``'s.
    """
    if not is_peft_model(peft_model):
        raise TypeError(
            f"hf_elsa.merge_and_unload takes a peft.PeftModel, got {type(peft_model).__name__}; a plain model has "
            "nothing to merge."
        )
    config = getattr(peft_model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"merge_and_unload: {type(config).__name__} is prompt learning (virtual tokens fed to the model), not a "
            "change of its weights: there is nothing to merge. Save the adapter with peft_model.save_pretrained() "
            "and load it with peft.PeftModel.from_pretrained() on the sparse model."
        )
    base = peft_model.get_base_model()
    masks = keep_masks(peft_model)
    if not masks:
        raise ValueError(
            "merge_and_unload: the base model has no masks attached and no zero weights, so there is no sparsity "
            "to keep; use the PeftModel's own merge_and_unload()."
        )
    names = _merged_adapters(peft_model, adapter_names)
    fine_tuning = {**_adapter_description(peft_model, names), **getattr(base, "elsa_lora_training", {}), "merged": True}
    previous = get_sparsity(base)
    # merged layer by layer (each mask re-applied at once, the dropped share measured exactly), then unloaded
    dropped = _merge_layers_keeping_masks(peft_model, masks, names, safe_merge)
    if dropped is not None:
        fine_tuning["adapter_delta_norm_dropped"] = round(dropped, 6)
    merged = peft_model.unload()  # progressbar: accepted for PEFT's signature; the merge above is quick
    params = dict(merged.named_parameters(remove_duplicate=False))
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ValueError(f"merge_and_unload: the merged model has no tensor {missing[0]!r} of the masks.")
    with torch.no_grad():  # a modules_to_save copy is a trainable leaf: re-masked without autograd
        for name, keep in masks.items():
            zero_pruned_(params[name].data, keep.to(params[name].device))
    if previous is not None and previous.config.fine_tuning:
        fine_tuning = {**previous.config.fine_tuning, **fine_tuning}
    metadata = {"fine_tuning": fine_tuning}
    if previous is None:
        metadata["method"] = "unknown (zeros of the base model)"
    attach_sparsity(merged, masks, metadata)
    merged.__dict__.pop("elsa_lora_training", None)
    if dropped is not None:
        logger.info(
            "merge_and_unload: adapters %s merged, %d masks re-applied; the masks dropped %.1f%% of the adapters' "
            "change in norm (its part on pruned weights)",
            names,
            len(masks),
            100 * dropped,
        )
    return merged
