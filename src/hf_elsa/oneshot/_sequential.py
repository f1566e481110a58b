"""Layer-by-layer calibration driver shared by Wanda and SparseGPT.

The model is never run end to end on the calibration set. The inputs of the first decoder layer are
captured once (a pre-hook stops the forward there); then, one decoder layer at a time:

1. hooks on the layer's prunable modules feed their inputs to per-module statistics;
2. the layer runs on every calibration batch;
3. its modules are pruned from those statistics;
4. the *pruned* layer runs again and its outputs become the next layer's inputs.

So each layer is calibrated on what the already pruned layers before it produce (the "sequential"
setting of the SparseGPT and Wanda papers), and only one layer's activations are alive at a time.

Under ``torch.distributed`` (DDP, FSDP2 before sharding) each process runs its share of the calibration batches
(every N-th) and the statistics are summed over processes before a module is pruned, so every process prunes
from the same statistics and N processes spend about 1/N of the calibration forward each. Statistics add each
batch's fp32 product into fp64 sums, so the result does not depend on how the batches were split: N processes
give the masks and weights of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class InputStatistic(Protocol):
    """What a pruner accumulates from the inputs of one module."""

    def update(self, inputs: torch.Tensor) -> None: ...

    def all_reduce(self, dst: int | None = None) -> None:
        """Sum the statistic over the processes (each saw its share of the calibration batches): on every process,
        or only on ``dst``, the one that prunes the module."""


MakeStatistic = Callable[[nn.Module], InputStatistic]
# prune(name, module, statistic) -> keep mask in the layout of module.weight; writes the weight itself
PruneModule = Callable[[str, nn.Module, InputStatistic], torch.Tensor]


class _StopForward(Exception):
    """Raised by the capture hook once the needed decoder-layer inputs are recorded."""


def as_token_ids(calibration: Any) -> torch.Tensor:
    """``[num_samples, seqlen]`` LongTensor from a tensor, a ``datasets.Dataset`` or a dict with ``input_ids``."""
    ids = calibration
    if hasattr(calibration, "with_format") and hasattr(calibration, "column_names"):
        if "input_ids" not in calibration.column_names:
            raise ValueError(
                f"calibration dataset has columns {calibration.column_names}; it needs an 'input_ids' column "
                "(hf_elsa.data.token_blocks makes one)."
            )
        ids = calibration.with_format("torch")[:]["input_ids"]
    elif isinstance(calibration, Mapping):
        ids = calibration["input_ids"]
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "calibration must be a LongTensor [num_samples, seqlen] or a Dataset whose 'input_ids' rows all have "
                "the same length."
            ) from exc
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(
            f"calibration must be integer token ids of shape [num_samples, seqlen]; got {tuple(ids.shape)} {ids.dtype}."
        )
    return ids.long()


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of decoder layers: the ``nn.ModuleList`` holding the most parameters.

    That is ``model.model.layers`` (Llama, Qwen2, Gemma, ...), ``model.model.decoder.layers`` (OPT),
    ``model.transformer.h`` (GPT-2) without naming any of them. ``None`` if the model has no ModuleList.
    """
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def _layer_kinds(model: nn.Module, num_layers: int) -> list[Any]:
    """Per decoder layer, a key of what the model feeds it besides hidden states.

    Models with mixed attention (Gemma 2/3, Qwen2 with sliding windows) give each layer the mask and
    rotary embeddings of its ``config.layer_types`` entry, so inputs captured at layer 0 are only
    valid for layers of the same type. Everything else: one kind.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        return list(types)
    return [None] * num_layers


def _move(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) argument structure to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This process's calibration batches: all of them on one process, every N-th batch on N processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    batches = list(ids.split(batch_size))
    rank, world = process_share()
    return batches[rank::world]


def process_share() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(*tensors: torch.Tensor, dst: int | None = None) -> None:
    """Sum ``tensors`` in place over the processes, on every one (or only on process ``dst``); no-op on one."""
    if process_share()[1] > 1:
        for tensor in tensors:
            if dst is None:
                torch.distributed.all_reduce(tensor)
            else:
                torch.distributed.reduce(tensor, dst)


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], dict[Any, list[tuple[tuple, dict]]]]:
    """Hidden states entering ``layers[0]`` per batch, and the other arguments per layer kind per batch.

    The forward is stopped (by raising) at the first layer of the last kind seen, so for a model with
    a single kind no decoder layer runs at all.
    """
    kinds = _layer_kinds(model, len(layers))
    first_of_kind = {}
    for index, kind in enumerate(kinds):
        first_of_kind.setdefault(kind, index)
    last_needed = max(first_of_kind.values())
    hidden: list[torch.Tensor] = []
    extras: dict[Any, list[tuple[tuple, dict]]] = {kind: [] for kind in first_of_kind}

    def make_hook(index: int, kind: Any):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                states, rest = args[0], tuple(args[1:])
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                hidden.append(states)
            extras[kind].append((rest, kwargs))
            if index == last_needed:
                raise _StopForward

        return hook

    handles = [
        layers[index].register_forward_pre_hook(make_hook(index, kind), with_kwargs=True)
        for kind, index in first_of_kind.items()
    ]
    device = _input_device(model)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError(
                f"{type(model).__name__}'s forward never reached its decoder layers; one-shot calibration needs the "
                "decoder layers to be the model's largest nn.ModuleList."
            )
    finally:
        for handle in handles:
            handle.remove()
    return hidden, extras


def _run_layer(layer: nn.Module, states: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    device = _device_of(layer, states.device)
    out = layer(_move(states, device), *_move(rest, device), **_move(kwargs, device))
    # transformers >= 5 returns the hidden states; older layers and some models return a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


def _collect(modules: Mapping[str, nn.Module], make_statistic: MakeStatistic, run: Callable[[], None]):
    """Run ``run()`` with pre-hooks that feed each module's input to a fresh statistic."""
    stats = {name: make_statistic(module) for name, module in modules.items()}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, stat=stats[name]):
            stat.update(args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _owners(modules: Mapping[str, nn.Module], world: int) -> dict[str, int]:
    """Which process prunes each module: largest first to the least loaded (the same on every process).

    A module's solve costs about ``in^2 (in + out)`` (SparseGPT's inverse and sweep), so an MLP's down projection
    outweighs an attention projection several times; round-robin would leave one process with most of the work.
    """
    loads, owners = [0.0] * world, {}

    def cost(item):
        weight = item[1].weight
        return float(weight.shape[-1]) ** 2 * (weight.shape[0] + weight.shape[-1])

    for name, _ in sorted(modules.items(), key=cost, reverse=True):
        owner = loads.index(min(loads))
        owners[name] = owner
        loads[owner] += cost((name, modules[name]))
    return owners


def _prune_modules(modules: Mapping[str, nn.Module], stats: dict, prune_module: PruneModule) -> dict[str, torch.Tensor]:
    """Prune each module from its statistic; on N processes module i is pruned by process i % N and its weight and
    mask are broadcast, so the per-module solves (SparseGPT's Cholesky and column sweep) are split too and every
    process ends with the bits the pruning process computed."""
    rank, world = process_share()
    owners = _owners(modules, world)
    masks = {}
    for name, module in modules.items():
        owner = owners[name]
        stat = stats.pop(name)  # free each statistic as soon as its module is done
        if world > 1:
            stat.all_reduce(dst=owner)  # the sums over every process's batches, where the module is pruned
        mask = prune_module(name, module, stat) if rank == owner else None
        if world > 1:
            weight = module.weight.data
            if mask is None:
                mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
            torch.distributed.broadcast(weight, src=owner)
            flags = mask.to(torch.uint8)
            torch.distributed.broadcast(flags, src=owner)
            mask = flags.bool()
        masks[name] = mask
        del stat
    return masks


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    calibration: Any,
    modules: Mapping[str, nn.Module],
    make_statistic: MakeStatistic,
    prune_module: PruneModule,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "pruning",
    execution_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``modules`` of ``model`` one decoder layer at a time; return their keep masks.

    Modules outside the decoder layers (e.g. OPT's ``project_in`` / ``project_out``) are pruned last,
    from one forward pass of the whole, already pruned model. ``execution_device``: a model kept on the CPU (FSDP
    before sharding) has each decoder layer moved there for its turn and back after it, so calibration runs on
    the accelerator while only one layer's weights occupy it.
    """
    ids = as_token_ids(calibration)
    batches = _batches(ids, batch_size)
    layers = find_decoder_layers(model)
    num_layers = len(layers) if layers is not None else 0

    owner = {}  # id(module) -> index of the decoder layer that contains it
    for index in range(num_layers):
        for sub in layers[index].modules():
            owner[id(sub)] = index
    per_layer: list[dict[str, nn.Module]] = [{} for _ in range(num_layers)]
    outside: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if id(module) in owner:
            per_layer[owner[id(module)]][name] = module
        else:
            outside[name] = module
    used = [i for i in range(num_layers) if per_layer[i]]

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    masks: dict[str, torch.Tensor] = {}
    try:
        if used:
            kinds = _layer_kinds(model, num_layers)
            hidden, extras = capture_layer_inputs(model, layers, batches)
            for index in tqdm(range(used[-1] + 1), desc=f"{desc} (layers)", disable=not progress):
                layer, kind = layers[index], kinds[index]
                home = _device_of(layer, torch.device("cpu"))
                onload = (
                    execution_device is not None and home.type == "cpu" and torch.device(execution_device).type != "cpu"
                )
                if onload:
                    layer.to(execution_device)

                # run_all is called only in this iteration, before `hidden` is reassigned; bound as a default it
                # would keep the last layer's activations alive past `del hidden`
                def run_all(layer=layer, kind=kind):
                    return [_run_layer(layer, h, *extras[kind][b]) for b, h in enumerate(hidden)]  # noqa: B023

                if per_layer[index]:
                    stats = _collect(per_layer[index], make_statistic, run_all)
                    masks.update(_prune_modules(per_layer[index], stats, prune_module))
                if index < used[-1]:
                    hidden = run_all()  # outputs of the pruned layer feed the next one
                if onload:
                    layer.to(home)
            del hidden, extras
        if outside:
            logger.info(
                "%s: %d module(s) outside the decoder layers, calibrated on the pruned model", desc, len(outside)
            )
            device = _input_device(model)

            def run_model():
                for batch in tqdm(batches, desc=f"{desc} (other modules)", disable=not progress):
                    model(input_ids=batch.to(device), use_cache=False)

            stats = _collect(outside, make_statistic, run_model)
            masks.update(_prune_modules(outside, stats, prune_module))
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache
    return {name: masks[name] for name in modules}
