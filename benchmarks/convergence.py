"""Does ELSA converge within a short budget? One run of one method on SmolLM2 + the Wikipedia sample.

    python benchmarks/convergence.py --method elsa --sparsity 0.7 --max_steps 150 [ElsaConfig fields...]
    python benchmarks/convergence.py --method masked_ft --sparsity 0.7 --max_steps 150

Methods: ``elsa`` (ElsaTrainer with the given fields), ``masked_ft`` (magnitude pruning, then masked
fine-tuning for the same steps: ElsaTrainer with admm_fraction=0), ``magnitude`` (one-shot, no training),
``dense``. Prints one JSON line with the held-out perplexity and the time per step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import HfArgumentParser, TrainerCallback

from hf_elsa import ElsaConfig, ElsaTrainer, perplexity, sparsity_report
from hf_elsa.data import token_blocks, tokenize_documents
from hf_elsa.projection import project
from hf_elsa.showcase.demo import load_smollm2, wikipedia_split
from hf_elsa.targets import find_prunable_modules


class PhaseTimer(TrainerCallback):
    """Wall time of each optimizer step, split into the ADMM phase and the fixed-mask phase."""

    def __init__(self):
        self.admm, self.fixed, self._start, self._admm = [], [], None, False

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._admm = time.perf_counter(), self.trainer.elsa_optimizer.in_admm_phase

    def on_step_end(self, args, state, control, **kwargs):
        (self.admm if self._admm else self.fixed).append(time.perf_counter() - self._start)


@dataclass
class RunArgs:
    method: str = field(default="elsa", metadata={"help": "elsa | masked_ft | magnitude | dense"})
    eval_seqlen: int = field(default=512)
    eval_windows: int = field(default=64, metadata={"help": "held-out windows of eval_seqlen tokens"})
    tag: str = field(default="")


def main(argv=None):
    parser = HfArgumentParser((RunArgs, ElsaConfig))
    run, args = parser.parse_args_into_dataclasses(argv)
    # training tokens per sequence: ElsaConfig's max_length (--block_size is its alias), 256 by default
    block_size = args.max_length or 256
    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    train_docs, eval_docs = wikipedia_split(0)
    eval_ids = tokenize_documents(eval_docs, tok)
    result = {
        "method": run.method,
        "tag": run.tag,
        "sparsity": args.sparsity,
        "sparsity_type": args.sparsity_type,
        "steps": args.max_steps,
        "tokens_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * block_size,
    }
    step_time = None
    if run.method in ("elsa", "masked_ft"):
        if run.method == "masked_ft":
            args.admm_fraction = 0.0
        train = token_blocks(train_docs, tok, block_size=block_size)
        trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
        timer = PhaseTimer()
        timer.trainer = trainer
        trainer.add_callback(timer)
        start = time.time()
        trainer.train()
        step_time = (time.time() - start) / args.max_steps  # the one-shot warm start included
        result["warm_start_s"] = getattr(trainer, "warm_start_seconds", None)
        runtime = [h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h]
        result["train_step_s"] = runtime[-1] / args.max_steps if runtime else None  # the Trainer's loop only
        # median seconds per step in each phase (the mask search's own cost is the ADMM phase's excess)
        result["admm_step_s"] = statistics.median(timer.admm) if timer.admm else None
        result["fixed_step_s"] = statistics.median(timer.fixed) if timer.fixed else None
        result["final_projection_removed"] = trainer.elsa_optimizer.final_removed
        # how far the mask search moved the mask: share of the prunable weights whose kept/pruned state differs
        # from the one-shot start's at the mask fix, and the share that flipped at the last z-update
        metrics = trainer.elsa_optimizer.metrics
        result["mask_moved_from_start"] = metrics.get("elsa/mask_moved_from_start")
        result["mask_change"] = metrics.get("elsa/mask_change")
        result["log"] = [h for h in trainer.state.log_history if "elsa/primal_residual" in h][-3:]
    elif run.method == "magnitude":
        with torch.no_grad():
            for m in find_prunable_modules(model).values():
                m.weight.copy_(project(m.weight, args.sparsity, args.sparsity_type)[0])
    result["achieved_sparsity"] = sparsity_report(model).sparsity
    start = time.time()
    result["ppl"] = perplexity(model, text=eval_ids, seqlen=run.eval_seqlen, max_windows=run.eval_windows)
    result["eval_s"] = time.time() - start
    result["step_s"] = step_time
    result["config"] = {**args.elsa_dict(), "learning_rate": args.learning_rate, "bf16": args.bf16}
    result["config"]["optim"] = str(getattr(args.optim, "value", args.optim))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
