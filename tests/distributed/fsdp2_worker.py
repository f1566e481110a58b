"""ElsaOptimizer on FSDP2 shards: run by ``test_fsdp2.py`` under ``torchrun --nproc_per_node 2`` (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/distributed/fsdp2_worker.py OUT_DIR

Every decoder layer and the root are ``fully_shard``-ed (parameters become DTensors sharded along dim 0);
AdamW is wrapped in ``ElsaOptimizer``; each process trains on its half of a global batch of 4 sequences.
For every configuration in ``CONFIGS`` the worker writes ``OUT_DIR/{config}_rank{rank}.pt`` with the
gathered final weights and masks, the logged metrics and two resumed runs (the state saved sharded with
``torch.distributed.checkpoint`` after ``RESUME_AT`` steps, loaded into a fresh model and optimizer, trained
to the end). The test imports this module to run the same training unsharded on one process.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

from hf_elsa import ElsaSettings
from hf_elsa.admm import MASK, ElsaOptimizer, U, Z
from hf_elsa.curvature import ActivationStatistics

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, run by torchrun
from conftest import VOCAB, make_model

STEPS = 8
GLOBAL_BATCH = 4
SEQ = 16
# A checkpoint inside the ADMM phase (z, u, lambda in the state) and one after the mask was fixed.
RESUME_AT = (3, 6)

CONFIGS = {
    # the default recipe's ingredients: proximal pull, cubic ramp, activation-aware score (statistics all-reduced)
    "unstructured-activation-proximal": ElsaSettings(
        recipe="paper",
        sparsity=0.7,
        admm_interval=1,
        admm_penalty="proximal",
        admm_lambda=1.0,
        admm_fraction=0.5,
        importance="activation",
        sparsity_schedule="cubic",
    ),
    # N:M groups lie in one output row: projected locally on each shard
    "2:4-adam-gradient": ElsaSettings(
        recipe="paper",
        sparsity_type="2:4",
        admm_interval=2,
        admm_penalty="gradient",
        admm_lambda=0.05,
        admm_fraction=0.5,
        importance="adam",
    ),
    # ELSA-L storage: FP8 z (one scale per tensor, max-reduced over the shards) with its residual in a bf16 u
    "unstructured-elsa-l-proximal": ElsaSettings(
        recipe="paper",
        sparsity=0.7,
        admm_interval=1,
        admm_penalty="proximal",
        admm_lambda=1.0,
        admm_fraction=0.5,
        admm_z_dtype="float8_e4m3fn",
        admm_u_dtype="bfloat16",
    ),
    # non-uniform allocations: thresholds and outlier counts summed over the shards, no tensor gathered
    "global-activation-proximal": ElsaSettings(
        sparsity=0.7,
        admm_interval=1,
        admm_fraction=0.5,
        sparsity_allocation="global",
        allocation_min_sparsity=0.5,
        allocation_max_sparsity=0.85,
    ),
    "owl-activation-proximal": ElsaSettings(
        sparsity=0.7, admm_interval=1, admm_fraction=0.5, sparsity_allocation="owl", owl_outlier_threshold=2.0
    ),
    "row-magnitude-gradient": ElsaSettings(
        recipe="paper",
        sparsity=0.5,
        sparsity_type="row",
        admm_interval=1,
        admm_penalty="gradient",
        admm_lambda_schedule="linear",
        admm_lambda_init=0.01,
        admm_lambda=0.1,
        admm_fraction=0.5,
    ),
}


def build_model(seed: int = 0) -> transformers.PreTrainedModel:
    return make_model("llama", seed=seed).train()


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)


def prunable_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def make_optimizer(model, settings: ElsaSettings):
    modules = prunable_modules(model)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    opt = ElsaOptimizer(base, {n: m.weight for n, m in modules.items()}, settings, total_steps=STEPS)
    hooks = ActivationStatistics(modules, opt.state_for) if settings.importance == "activation" else None
    return opt, hooks


def train(model, opt, hooks, steps: range, rank: int = 0, world: int = 1) -> list[dict]:
    """Run ``steps``; this process gets rows ``rank::world`` of each global batch. Returns the metrics per step."""
    history = []
    for step in steps:
        ids = global_batch(step)[rank::world]
        if hooks is not None and opt.in_admm_phase:
            hooks.attach()
        elif hooks is not None:
            hooks.remove()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.mask_gradients()
        opt.step()
        opt.zero_grad()
        history.append(dict(opt.metrics))
    if hooks is not None:
        hooks.remove()
    return history


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(opt: ElsaOptimizer) -> dict:
    return {
        "weights": {n: full(p) for n, p in opt.prunable.items()},
        "masks": {n: full(m) for n, m in opt.masks().items()},
    }


def shard(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    for config_name, settings in CONFIGS.items():
        model = build_model()
        shard(model, mesh)
        opt, hooks = make_optimizer(model, settings)
        history = train(model, opt, hooks, range(STEPS), rank, world)
        record = {"world_size": world, "rank": rank, "history": history, **snapshot(opt)}
        p = next(iter(opt.prunable.values()))
        record["param_is_dtensor"] = isinstance(p, DTensor)
        record["local_rows"] = p.to_local().shape[0] if isinstance(p, DTensor) else None
        record["mask_layout"] = [
            (
                isinstance(opt.state[p][MASK], DTensor),
                opt.state[p][MASK].dtype == torch.bool,
                getattr(opt.state[p][MASK], "placements", None) == getattr(p, "placements", 0),
            )
            for p in opt.prunable.values()
        ]

        for k in RESUME_AT:
            ckpt = os.path.join(out_dir, f"{config_name}_ckpt{k}")
            first = build_model()
            shard(first, mesh)
            opt_a, hooks_a = make_optimizer(first, settings)
            train(first, opt_a, hooks_a, range(k), rank, world)
            layout = [
                (isinstance(opt_a.state[p][key], DTensor), opt_a.state[p][key].placements == p.placements)
                for p in opt_a.prunable.values()
                for key in (Z, U, MASK)
                if key in opt_a.state[p]
            ]
            model_sd, optim_sd = get_state_dict(first, opt_a)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)

            resumed = build_model(seed=1)  # different weights: everything must come from the checkpoint
            shard(resumed, mesh)
            opt_b, hooks_b = make_optimizer(resumed, settings)
            if k == RESUME_AT[0]:
                opt_b.init_state(steps_done=k)  # explicit template
            else:
                opt_b.resume_step = k  # template built by torch.distributed.checkpoint's own zero-lr step()
            model_sd, optim_sd = get_state_dict(resumed, opt_b)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(resumed, opt_b, model_state_dict=state["model"], optim_state_dict=state["optim"])
            loaded_steps = opt_b.steps_done
            train(resumed, opt_b, hooks_b, range(k, STEPS), rank, world)
            record[f"resumed_{k}"] = {"state_layout": layout, "steps_done_after_load": loaded_steps, **snapshot(opt_b)}
        torch.save(record, os.path.join(out_dir, f"{config_name}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
