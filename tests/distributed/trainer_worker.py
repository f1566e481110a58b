"""``ElsaTrainer`` itself on 1 or 2 gloo processes (CPU): the default recipe under DDP, FSDP2, LoRA and resume.

    python tests/distributed/trainer_worker.py OUT CASE [CASE ...]                              # 1 process
    torchrun --standalone --nproc_per_node 2 tests/distributed/trainer_worker.py OUT CASE ...   # DDP / FSDP2
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes 2 \\
        tests/distributed/trainer_worker.py OUT CASE ...                                       # (ACCELERATE_USE_CPU=1)

Every case trains a tiny Llama on the same global batch of 8 blocks per step (1 process: 4 x 2 accumulated
micro-batches; 2 processes: 4 each, or 2 x 2 accumulated for the accumulation case) and writes
``OUT/{case}_rank{rank}.pt``: the final weights and masks (whole tensors), the logged losses, the warm start's wall
time, and for resume cases the weights of a second run resumed from a checkpoint of the first.

FSDP2 on the CPU (cases with ``fsdp2=True``): transformers' Trainer gets accelerate's FSDP plugin only for GPU-type
process groups (2026-12, accelerate 1.x: ``AcceleratorState`` turns FSDP on for ``MULTI_GPU``-like types, never for
``MULTI_CPU``, and the Trainer refuses ``fsdp=`` without it). Before the Trainer is built, the worker marks the
gloo group as ``MULTI_GPU``; accelerate then runs its real FSDP2 preparation on the CPU: ``fully_shard`` per decoder
layer and at the root, DTensor parameters, sharded checkpoints. Test-only: ``benchmarks/gpu_session.sh`` runs the
real ``accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml`` on GPUs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when launched
from conftest import lm_dataset, make_model

STEPS = 6
GLOBAL_BATCH = 8
SPARSITY = 0.8  # from 80% up the default recipe starts 10 points denser and ADMM's ramp prunes the rest


@dataclass
class Case:
    """One cell of the matrix: ElsaConfig overrides on top of the default recipe, and how the run is set up."""

    overrides: dict = field(default_factory=dict)
    fsdp2: bool = False
    accumulate_on_each: int = 1  # gradient accumulation steps of each of 2 processes (1 process: 2 / this x 2)
    pruned_start: bool = False  # the model comes pruned (magnitude, masks attached): keep-mask and LoRA runs
    peft: str | None = None  # "config": ElsaTrainer(peft_config=...); "model": a PeftModel as model=
    teacher: bool = False  # pass the dense model as teacher_model=
    resume_at: int | None = None  # also resume a second run from checkpoint-{resume_at} of the first


CASES = {
    "default": Case(),
    "paper": Case({"recipe": "paper"}),  # the penalty through the gradient, after DDP's all-reduce
    "distill_hidden": Case({"distill_temperature": 2.0, "distill_hidden_weight": 0.1}),  # every distillation term
    "accumulation": Case(accumulate_on_each=2),
    "nm": Case({"sparsity_type": "2:4"}),
    "nm_ramp": Case({"sparsity_type": "2:4", "admm_init_sparsity": 0.3}),  # z ramps from 30% into 2:4
    "global": Case({"sparsity_allocation": "global"}),
    "owl": Case({"sparsity_allocation": "owl"}),
    "elsa_l": Case({"elsa_l": True}),
    "checkpointing": Case({"gradient_checkpointing": True}),
    "bf16": Case({"bf16": True}),
    "keep_mask": Case({"keep_mask": True}, pruned_start=True),
    "keep_mask_teacher": Case({"keep_mask": True}, pruned_start=True, teacher=True),
    "lora_config": Case(pruned_start=True, peft="config"),
    "lora_model_teacher": Case(pruned_start=True, peft="model", teacher=True),
    "resume_admm": Case(resume_at=2),  # admm_fraction 0.5 of 6 steps: the mask is fixed after step 3
    "resume_fixed": Case(resume_at=4),
    "fsdp2": Case(fsdp2=True),
    "fsdp2_resume_admm": Case(fsdp2=True, resume_at=2),
    "fsdp2_resume_fixed": Case(fsdp2=True, resume_at=4),
}


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _mark_gloo_group_as_gpu_type() -> None:
    """Let accelerate build its FSDP2 plugin on a CPU process group (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _config(case: Case, out: str, world: int, resume: bool = False):
    from hf_elsa import ElsaConfig

    accumulation = case.accumulate_on_each if world > 1 else 2 * case.accumulate_on_each
    per_device = GLOBAL_BATCH // (world * accumulation)
    kwargs = {
        "output_dir": out,
        "max_steps": STEPS,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "sparsity": SPARSITY,
        "admm_fraction": 0.5,
        "admm_interval": 1,
        "admm_init_samples": 16,
        "use_cpu": True,
        "report_to": "none",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "save_strategy": "steps" if case.resume_at else "no",
        "save_steps": case.resume_at or 500,
        **case.overrides,
    }
    if case.fsdp2 and world > 1:  # its 1-process reference is the plain run
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    return ElsaConfig(**kwargs)


def _model(case: Case):
    """The student as the case has it: dense, or pruned with masks attached (and wrapped in LoRA)."""
    from hf_elsa import attach_sparsity
    from hf_elsa.oneshot import magnitude

    model = make_model("llama")
    if case.pruned_start:
        masks = magnitude(model, sparsity=SPARSITY)
        attach_sparsity(model, {f"{name}.weight": mask for name, mask in masks.items()})
    if case.peft == "model":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()


def _train(case: Case, out: str, world: int, resume: str | None = None):
    from hf_elsa import ElsaTrainer

    args = _config(case, out, world)
    if case.fsdp2 and world > 1:
        _ = args.device  # TrainingArguments sets up (and resets) accelerate's state here: mark after it
        _mark_gloo_group_as_gpu_type()
    kwargs = {}
    if case.peft == "config":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    if case.teacher:
        kwargs["teacher_model"] = make_model("llama")  # the same seed: the dense model before pruning
    trainer = ElsaTrainer(model=_model(case), args=args, train_dataset=lm_dataset(64), **kwargs)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    return trainer, seconds


def _record(trainer, seconds: float) -> dict:
    from hf_elsa.lora import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        from hf_elsa import merge_and_unload

        model = merge_and_unload(model)
    prunable = {name: _full(module.weight) for name, module in trainer.prunable_modules.items()}
    opt = trainer.elsa_optimizer
    masks = {n: _full(m) for n, m in opt.masks().items()} if opt is not None else {}
    history = [
        {k: v for k, v in h.items() if k in ("loss", "loss_ce", "loss_distill")} for h in trainer.state.log_history
    ]
    return {
        "memory": _memory(trainer),
        "weights": prunable,
        "masks": masks,
        "history": [h for h in history if h],
        "teacher": trainer._teacher is not None,
        "admm_init_sparsity": trainer.args.admm_init_sparsity,
        "mask_moved_from_start": opt.metrics.get("elsa/mask_moved_from_start") if opt is not None else None,
        "seconds": seconds,
        "warm_start_seconds": getattr(trainer, "warm_start_seconds", None),
        "param_is_dtensor": any(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
        "model_type": type(model).__name__,
    }


def _memory(trainer) -> dict:
    """Bytes this process holds (its shards under FSDP2) against ``estimate_memory`` for the same run."""
    from dataclasses import asdict

    from hf_elsa import estimate_memory
    from hf_elsa.memory import measure_state_bytes

    def held(model) -> int:
        return sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())

    teacher = trainer._teacher.model if trainer._teacher is not None else None
    measured = {"weights": held(trainer.model), "teacher": held(teacher) if teacher is not None else 0}
    measured.update(measure_state_bytes(trainer.optimizer))
    estimate = estimate_memory(make_model("llama"), trainer.args, processes=trainer.args.world_size)
    return {"measured": measured, "estimate": asdict(estimate)}


def run(out: str, names: list[str]) -> None:
    rank, world = _world()
    for name in names:
        case = CASES[name]
        folder = os.path.join(out, f"{name}_w{world}")
        trainer, seconds = _train(case, folder, world)
        record = _record(trainer, seconds)
        if case.resume_at:
            resumed, resumed_seconds = _train(case, folder, world, os.path.join(folder, f"checkpoint-{case.resume_at}"))
            record["resumed"] = _record(resumed, resumed_seconds)
        record.update(rank=rank, world_size=world)
        torch.save(record, os.path.join(out, f"{name}_rank{rank}.pt"))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        _reset_accelerate()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(sys.argv[1], sys.argv[2:])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
