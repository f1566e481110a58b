"""GPU check of ElsaTrainer under DDP and FSDP2 (CUDA, one or more GPUs). Not part of the CPU test suite.

    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes N tests/distributed/gpu_check.py
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes N tests/distributed/gpu_check.py
    torchrun --nproc_per_node N tests/distributed/gpu_check.py          # DDP through torchrun
    python tests/distributed/gpu_check.py --bf16 --elsa_l               # one GPU, bf16 autocast, ELSA-L state
    python tests/distributed/gpu_check.py --cpu                         # dry run of the logic on CPU

Trains a tiny Llama (the suite's ``conftest.make_model``, a character tokenizer) on the default recipe for 8 steps (ADMM for 4, then the
mask fixed), checkpointing every 3 steps, then resumes from checkpoint-3 (inside ADMM: z, u in the state)
and checkpoint-6 (mask fixed) with freshly initialised models. Checks, on every process:

- exact sparsity: every prunable weight has exactly round(numel * sparsity) zeros, all where its mask prunes;
- the masks and the weights are identical on every process (checksums gathered from all ranks);
- both resumed runs end with the masks of the uninterrupted run and weights within 1e-5 (CUDA kernels
  may be non-deterministic);
- the saved folder (trainer.save_model) reports the same sparsity (FULL_STATE_DICT / DDP saves only).

Prints one PASS/FAIL line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from hf_elsa import ElsaConfig, ElsaTrainer, sparsity_report
from hf_elsa.data import token_blocks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_char_tokenizer, make_model

SPARSITY = 0.7
STEPS = 8


def _documents() -> list[str]:
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "river", "stone", "market", "signal", "garden"]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200))]


def _run(out: str, seed: int, resume: str | None = None, use_cpu: bool = False, **fields):
    model, tokenizer = make_model("llama", seed=seed), make_char_tokenizer()
    train = token_blocks(_documents(), tokenizer, block_size=32, num_blocks=64)
    args = ElsaConfig(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3, sparsity=SPARSITY,
        admm_fraction=0.5, admm_interval=1, save_strategy="steps", save_steps=3, logging_steps=1,
        report_to="none", seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, use_cpu=use_cpu,
        **fields,
    )  # fmt: skip
    trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train(resume_from_checkpoint=resume)
    opt = trainer.elsa_optimizer
    weights = {n: _full(p).cpu() for n, p in opt.prunable.items()}
    masks = {n: _full(m).cpu() for n, m in opt.masks().items()}
    return trainer, weights, masks


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _checksum(tensors: dict[str, torch.Tensor]) -> list[float]:
    return [
        float(t.double().flatten().mul(torch.arange(1, t.numel() + 1, dtype=torch.float64)).sum())
        for t in tensors.values()
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder)")
    parser.add_argument("--cpu", action="store_true", help="dry run of this script's logic on CPU (DDP over gloo)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    parser.add_argument("--elsa_l", action="store_true", help="ELSA-L: z FP8, u bf16, 8-bit AdamW (bitsandbytes)")
    cli = parser.parse_args()
    fields = {"bf16": cli.bf16, "elsa_l": cli.elsa_l}
    out = cli.out or os.path.join(tempfile.gettempdir(), "hf_elsa_gpu_check")
    if not torch.cuda.is_available() and not cli.cpu:
        print("FAIL: no CUDA device (this check is for GPUs; the CPU tests are tests/distributed/test_*.py)")
        return 1
    results: list[tuple[str, bool, str]] = []

    trainer, weights, masks = _run(os.path.join(out, "straight"), seed=0, use_cpu=cli.cpu, **fields)
    state = trainer.accelerator.state
    world, rank = trainer.args.world_size, trainer.args.process_index
    device = "CPU (dry run)" if cli.cpu else torch.cuda.get_device_name()
    setup = f"{state.distributed_type} on {world} process(es), {device}" + "".join(
        f", {name}" for name, on in fields.items() if on
    )
    fsdp = "FSDP" in str(state.distributed_type)
    if fsdp:
        p = next(iter(trainer.elsa_optimizer.prunable.values()))
        sharded = hasattr(p, "full_tensor")
        results.append(("parameters are DTensor shards (FSDP2)", sharded, type(p).__name__))

    bad = [n for n, w in weights.items() if n not in masks or int((w == 0).sum()) < round(w.numel() * SPARSITY)
           or bool(w[~masks[n]].ne(0).any()) or int((~masks[n]).sum()) != round(w.numel() * SPARSITY)]  # fmt: skip
    results.append(
        ("exact sparsity of every prunable weight", not bad and len(masks) == len(weights), str(bad[:3]) if bad else "")
    )

    sums = [None] * world if dist.is_initialized() else None
    local = (_checksum(masks), _checksum(weights))
    if sums is not None:
        dist.all_gather_object(sums, local)
    else:
        sums = [local]
    results.append(("masks identical on every process", all(s[0] == sums[0][0] for s in sums), ""))
    results.append(("weights identical on every process", all(s[1] == sums[0][1] for s in sums), ""))

    for step in (3, 6):
        checkpoint = os.path.join(out, "straight", f"checkpoint-{step}")
        _, w_resumed, m_resumed = _run(
            # the same script run again: the dense model goes in (distillation's teacher), the checkpoint restores
            # the pruned student and the ADMM state
            os.path.join(out, f"resumed{step}"),
            seed=0,
            resume=checkpoint,
            use_cpu=cli.cpu,
            **fields,
        )
        same_masks = m_resumed.keys() == masks.keys() and all(torch.equal(m_resumed[n], masks[n]) for n in masks)
        diff = max((w_resumed[n] - weights[n]).abs().max().item() for n in weights)
        results.append((f"resume from checkpoint-{step} matches the straight run", same_masks and diff <= 1e-5,
                        f"masks equal {same_masks}, max weight diff {diff:.2e}"))  # fmt: skip

    trainer.save_model()
    if trainer.is_world_process_zero() and os.path.isfile(os.path.join(out, "straight", "elsa_config.json")):
        report = sparsity_report(os.path.join(out, "straight"))
        ok = all(abs(t.sparsity - SPARSITY) < 1e-3 for t in report.tensors)
        results.append(("saved folder is exactly sparse", ok, f"{len(report.tensors)} tensors"))
    elif trainer.is_world_process_zero():
        results.append(
            ("saved folder written", not fsdp, "no elsa_config.json (SHARDED_STATE_DICT saves no HF folder)")
        )

    failed = [r for r in results if not r[1]]
    if rank == 0:
        print(f"\nhf_elsa GPU check: {setup}")
        for name, ok, detail in results:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
        print("ALL PASSED" if not failed else f"{len(failed)} FAILED")
    if dist.is_initialized():
        flag = torch.tensor(float(bool(failed)), device="cpu" if cli.cpu else "cuda")
        dist.all_reduce(flag)
        failed = failed or bool(flag.item())
        dist.barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
