"""Prune a causal LM with ELSA: the same script on one process, under ``torchrun`` or ``accelerate launch``.

    # one process (GPU if there is one, else CPU)
    python examples/prune.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --text_files a.txt b.txt \
        --output_dir out --sparsity 0.7 --max_steps 500 --per_device_train_batch_size 8 --bf16

    # N GPUs, data parallel: the global batch is N x per_device_train_batch_size
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes N examples/prune.py ...
    torchrun --nproc_per_node N examples/prune.py ...

    # N GPUs, FSDP2 (parameters, gradients, optimizer and ADMM state sharded)
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes N examples/prune.py ...

Every ``ElsaConfig`` / ``TrainingArguments`` field is a ``--field value`` option; the script's own options
are in ``ScriptArguments``. ``--tiny`` builds a tiny random Llama and a character tokenizer from configs
(offline, seconds on a CPU): the multi-process tests run this script that way (docs/scaling.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainerCallback

from hf_elsa import ElsaConfig, ElsaTrainer
from hf_elsa.admm import LAMBDA, STEP, U, Z
from hf_elsa.data import load_documents, token_blocks


@dataclass
class ScriptArguments:
    """Model and data options of this script (the training options are ``ElsaConfig``'s)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id. Required unless --tiny."}
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Build a tiny random Llama (2 layers, hidden 32) and a character tokenizer offline."},
    )
    text_files: list[str] | None = field(default=None, metadata={"help": "Plain text files, one document each."})
    dataset: str | None = field(default=None, metadata={"help": "datasets name or local loader/path."})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    num_blocks: int | None = field(
        default=None,
        metadata={"help": "Draw this many blocks at seeded random offsets (default: every non-overlapping block)."},
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
    parser = HfArgumentParser((ScriptArguments, ElsaConfig))
    script, config = parser.parse_args_into_dataclasses(argv)
    if script.tiny:
        model, tokenizer = tiny_model_and_tokenizer(config.seed)
    elif script.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    else:
        parser.error("pass --model_name_or_path (a folder or Hub id) or --tiny")

    documents = load_documents(script.text_files, script.dataset, script.dataset_config, text_column=script.text_column)
    train = token_blocks(documents, tokenizer, block_size=script.block_size, num_blocks=script.num_blocks)

    trainer = ElsaTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    dump = DumpAdmmState(trainer) if script.dump_state else None
    if dump is not None:
        trainer.add_callback(dump)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()

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
        print(f"pruned model saved to {config.output_dir} ({trainer.args.world_size} process(es))")


if __name__ == "__main__":
    main()
