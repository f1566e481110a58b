"""Prune a causal LM with ELSA's default recipe: the same script on one process, under torchrun or accelerate launch.

    # one process (GPU if there is one, else CPU)
    python examples/prune.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --text_files a.txt b.txt \
        --output_dir out --sparsity 0.7 --max_steps 500 --per_device_train_batch_size 8 --bf16
    python examples/prune.py --config run.yaml            # any option, as YAML; the command line wins

    # N GPUs, data parallel: the global batch is N x per_device_train_batch_size
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes N examples/prune.py ...
    # N GPUs, FSDP2: weights, gradients, optimizer and ADMM state sharded; the distillation teacher too
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes N examples/prune.py ...

The options are those of ``hf-elsa prune`` (every ``ElsaConfig`` / ``TrainingArguments`` field, the model and the
text). The default recipe starts from SparseGPT (its calibration split over the processes) and distils from the
dense model; ``docs/recipes.md`` explains each part.
"""

from __future__ import annotations

from hf_elsa import ElsaConfig, ElsaTrainer
from hf_elsa.scripts import (
    DataArguments,
    ElsaArgumentParser,
    ModelArguments,
    eval_windows,
    load_model_and_tokenizer,
    load_text,
    record_evaluation,
    train_blocks,
)


def main(argv: list[str] | None = None) -> None:
    parser = ElsaArgumentParser((ElsaConfig, ModelArguments, DataArguments))
    config, model_args, data = parser.parse_args_and_config(argv)
    model, tokenizer = load_model_and_tokenizer(model_args)

    text = load_text(data, tokenizer, "prune")  # --text_files or a datasets dataset, with a held-out share
    train = train_blocks(text, data, seed=config.seed)
    held = eval_windows(text.eval, data, model)

    trainer = ElsaTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=held.dataset() if held is not None else None,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    ppl = None
    if held is not None:  # every process runs the evaluation; the result goes into the saved card
        ppl = trainer.evaluate()["eval_perplexity"]
        record_evaluation(trainer.model, ppl, held.protocol(f"held-out text ({text.how})"))
    trainer.save_model()  # exact zeros + masks + model card, written once

    if trainer.is_world_process_zero():
        scored = f"held-out perplexity {ppl:.2f}; " if ppl is not None else ""
        print(f"{scored}pruned model saved to {config.output_dir} ({trainer.args.world_size} process(es))")


if __name__ == "__main__":
    main()
