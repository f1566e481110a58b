"""Prune a causal LM with ELSA: the same script on one process, under ``torchrun`` or ``accelerate launch``.

    # one process (GPU if there is one, else CPU)
    python examples/prune.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --text_files a.txt b.txt \
        --output_dir out --sparsity 0.7 --max_steps 500 --per_device_train_batch_size 8 --bf16
    python examples/prune.py --config run.yaml            # any option below, as YAML; the command line wins

    # N GPUs, data parallel: the global batch is N x per_device_train_batch_size
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes N examples/prune.py ...
    torchrun --nproc_per_node N examples/prune.py ...

    # N GPUs, FSDP2 (parameters, gradients, optimizer and ADMM state sharded)
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes N examples/prune.py ...

The options are those of ``hf-elsa prune`` (``hf_elsa.scripts``: ``--model_name_or_path``, ``--text_files``,
``--dataset_name`` / ``--dataset_config`` / ``--dataset_split`` / ``--data_files``, ``--dtype``,
``--attn_implementation``, ``--compressed``, ``--config``, every ``ElsaConfig`` / ``TrainingArguments`` field),
plus two of this script's own (``ScriptArguments``). Held-out text (``--eval_fraction``) is scored with
``trainer.evaluate()``, so it runs on every process. ``--tiny`` builds a tiny random Llama and a character
tokenizer from configs (offline, seconds on a CPU): the multi-process tests run this script that way
(docs/scaling.md). ``--method`` other than ``elsa`` is ``hf-elsa prune``'s (one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_elsa import ElsaConfig, ElsaTrainer
from hf_elsa.admm import LAMBDA, STEP, U, Z
from hf_elsa.scripts import (
    DataArguments,
    ElsaArgumentParser,
    ModelArguments,
    RunArguments,
    eval_windows,
    load_model_and_tokenizer,
    load_text,
    record_evaluation,
    save_compressed,
    train_blocks,
)


@dataclass
class ScriptArguments:
    """This script's own options (the rest are ``hf-elsa prune``'s)."""

    _argument_group_name = "example script options"

    tiny: bool = field(
        default=False,
        metadata={"help": "Build a tiny random Llama (2 layers, hidden 32) and a character tokenizer offline."},
    )
    dump_state: str | None = field(
        default=None,
        metadata={
            "help": "Folder: write this process's final weights, masks, last ADMM state (z, u, lambda) and logs "
            "to DUMP_STATE/rank{RANK}.pt (used by the multi-process tests)."
        },
    )


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer Llama (hidden 32) with seeded random weights and a character-level tokenizer, built offline."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float(), tokenizer


class DumpAdmmState(TrainerCallback):
    """Keep a copy of the latest ADMM state (z, u, lambda, step) while it exists; the mask fix drops it."""

    def __init__(self, trainer: ElsaTrainer):
        self.trainer = trainer
        self.admm_state: dict[str, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.trainer.elsa_optimizer
        if opt is None or not opt.in_admm_phase:
            return
        self.admm_state = {}
        for name in opt.prunable:
            state = opt.state_for(name)
            z, u = opt.z_and_u(name)
            self.admm_state[name] = {Z: _plain(z), U: _plain(u), LAMBDA: state[LAMBDA], STEP: state[STEP]}


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return value.detach().cpu().clone()
    return value


def main(argv: list[str] | None = None) -> None:
    parser = ElsaArgumentParser((ElsaConfig, ModelArguments, DataArguments, RunArguments, ScriptArguments))
    config, model_args, data, run, script = parser.parse_args_and_config(argv)
    if run.method != "elsa":
        parser.error(f"--method {run.method}: one-shot pruning runs on one process with `hf-elsa prune`.")
    if script.tiny:
        model, tokenizer = tiny_model_and_tokenizer(config.seed)
    elif model_args.model_name_or_path:
        model, tokenizer = load_model_and_tokenizer(model_args)
    else:
        parser.error("pass --model_name_or_path (a folder or Hub id) or --tiny")

    text = load_text(data, tokenizer, "prune")
    train = train_blocks(text, data, seed=config.seed)
    held = eval_windows(text.eval, data, model)

    trainer = ElsaTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=held.dataset() if held is not None else None,
        processing_class=tokenizer,
    )
    dump = DumpAdmmState(trainer) if script.dump_state else None
    if dump is not None:
        trainer.add_callback(dump)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    ppl = None
    if held is not None:
        ppl = trainer.evaluate()["eval_perplexity"]
        record_evaluation(trainer.model, ppl, held.protocol(f"held-out text ({text.how})"))
    trainer.save_model()
    if run.compressed:
        save_compressed(trainer)

    if dump is not None:
        opt = trainer.elsa_optimizer
        rank = trainer.args.process_index
        record = {
            "rank": rank,
            "world_size": trainer.args.world_size,
            "weights": {name: _plain(p) for name, p in opt.prunable.items()},
            "masks": {name: _plain(mask) for name, mask in opt.masks().items()},
            "admm_state": dump.admm_state,
            "log_history": trainer.state.log_history,
        }
        os.makedirs(script.dump_state, exist_ok=True)
        torch.save(record, os.path.join(script.dump_state, f"rank{rank}.pt"))
    if trainer.is_world_process_zero():
        scored = f"held-out perplexity {ppl:.2f}; " if ppl is not None else ""
        print(f"{scored}pruned model saved to {config.output_dir} ({trainer.args.world_size} process(es))")


if __name__ == "__main__":
    main()
