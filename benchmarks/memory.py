"""Predicted vs measured memory on SmolLM2-135M: plain Trainer vs ElsaTrainer vs ELSA-L, same batch.

    python benchmarks/memory.py [--steps 3] [--batch_size 1] [--block_size 64]

Each configuration runs in its own subprocess (so peak process memory is its own): load SmolLM2 in fp32,
reset the peak-RSS counter (/proc/self/clear_refs), train ``--steps`` steps, then report

- the ADMM and base-optimizer state actually allocated (bytes of the tensors in ``optimizer.state``,
  each storage once), next to ``hf_elsa.estimate_memory``'s prediction and their ratio;
- the peak resident memory during training (VmHWM), its increase over the resident memory after loading
  (which holds the weights and the Python/torch runtime), and the predicted increase: gradients +
  optimizer + ADMM state (activations and temporaries are not predicted).

The run stops inside the ADMM phase (``max_steps`` is large; a callback stops after ``--steps``), where z
and u exist. Prints one table and, with ``--json``, one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("trainer", "elsa", "elsa_l")


def _proc_status(key: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(name: str, steps: int, batch_size: int, block_size: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_elsa import ElsaConfig, ElsaTrainer, estimate_memory
    from hf_elsa.memory import measure_state_bytes, optimizer_state_bytes
    from hf_elsa.showcase.demo import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    ids = torch.randint(0, len(tokenizer), (max(4 * steps, 8) * batch_size, block_size), generator=torch.Generator())
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    common = {
        "output_dir": f"/tmp/hf_elsa_memory_{name}",
        "max_steps": 1000,  # only --steps run: the ADMM phase (15% of max_steps) is still on when we measure
        "per_device_train_batch_size": batch_size,
        "learning_rate": 1e-5,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    measured: dict = {}

    class Measure(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                measured.update(measure_state_bytes(trainer.optimizer))
                control.should_training_stop = True

    if name == "trainer":
        # (every TrainingArguments resets accelerate's state: build them all before the Trainer)
        reference = estimate_memory(model, ElsaConfig(**common))
        args = TrainingArguments(**common)
        predicted = {
            "admm": 0,
            "optimizer": optimizer_state_bytes(args.optim, [p for p in model.parameters() if p.requires_grad]),
            "gradients": reference.gradients,
            "weights": reference.weights,
            "prunable": reference.prunable_parameters,
        }
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Measure()])
    else:
        args = ElsaConfig(elsa_l=name == "elsa_l", **common)
        trainer = ElsaTrainer(model=model, args=args, train_dataset=dataset, callbacks=[Measure()])
        estimate = estimate_memory(model, args)
        predicted = {
            "admm": estimate.admm,
            "optimizer": estimate.optimizer,
            "gradients": estimate.gradients,
            "weights": estimate.weights,
            "prunable": estimate.prunable_parameters,
        }
    gc.collect()
    peak_reset = _reset_peak()
    rss_before = _proc_status("VmRSS")
    start = time.time()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "stopped inside the ADMM phase": on purpose
        trainer.train()
    seconds = time.time() - start
    return {
        "config": name,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "predicted": predicted,
        "measured": measured,
        "rss_after_load": rss_before,
        "peak_rss": _proc_status("VmHWM"),
        "peak_reset": peak_reset,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def report(results: list[dict]) -> str:
    lines = [
        (
            f"{'config':<8} {'optim':<18} {'ADMM pred':>10} {'ADMM meas':>10} {'ratio':>6} {'B/prunable':>10} "
            f"{'opt pred':>9} {'opt meas':>9} {'ratio':>6} {'peak RSS':>9} {'increase':>9} {'pred incr':>9} "
            f"{'ratio':>6}"
        )
    ]
    for r in results:
        p, m = r["predicted"], r["measured"]
        increase = r["peak_rss"] - r["rss_after_load"]
        predicted_increase = p["gradients"] + p["optimizer"] + p["admm"]
        lines.append(
            f"{r['config']:<8} {r['optim']:<18} {_mib(p['admm']):>10} {_mib(m['admm']):>10} "
            f"{_ratio(p['admm'], m['admm']):>6} {m['admm'] / p['prunable']:>10.3f} "
            f"{_mib(p['optimizer']):>9} {_mib(m['optimizer']):>9} {_ratio(p['optimizer'], m['optimizer']):>6} "
            f"{_mib(r['peak_rss']):>9} {_mib(increase):>9} {_mib(predicted_increase):>9} "
            f"{_ratio(predicted_increase, increase):>6}"
        )
    lines.append(
        "MiB; ratio = predicted / measured. B/prunable: measured ADMM bytes per prunable weight. peak RSS: VmHWM "
        "during training; increase: over the RSS after loading the model (weights + runtime); pred incr: "
        "gradients + optimizer + ADMM state (activations not predicted)."
    )
    if not all(r["peak_reset"] for r in results):
        lines.append("(peak RSS could not be reset after loading: it includes the loading peak)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per configuration")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args(argv)
    sizes = ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--block_size", str(args.block_size)]
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch_size, args.block_size)))
        return 0
    results = []
    for name in args.configs:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, *sizes], capture_output=True, text=True, check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        if args.json:
            print(json.dumps(results[-1]))
    print(f"SmolLM2-135M, fp32 weights, batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
