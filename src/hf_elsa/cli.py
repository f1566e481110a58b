"""The ``hf-elsa`` command: one subcommand per function.

    hf-elsa prune [--model DIR] [--text FILE ...] --output_dir OUT --sparsity 0.9 --max_steps 500 ...
    hf-elsa eval --model OUT [--text FILE ...]
    hf-elsa inspect DIR [--json] [--summary]
    hf-elsa demo [--sparsity 0.5] [--max_steps 60]
    hf-elsa memory [--model DIR] [--json] [ElsaConfig fields, e.g. --elsa_l true]

Each subcommand is an entry of ``COMMANDS``: ``name -> (add_arguments, run, help)``. ``add_arguments``
fills the subcommand's ``argparse`` parser; ``run(args)`` does the work and returns the exit status.
Add ``prune``, ``eval``, ``demo`` the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# -- inspect ----------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a saved model folder (hf_elsa dense or compressed, or plain)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--summary", action="store_true", help="print the totals only, not one line per tensor")


def inspect_command(args: argparse.Namespace) -> int:
    """Print the sparsity of a saved folder, read from its safetensors files (the model is not built)."""
    from .sparse_io import ELSA_CONFIG_NAME, sparsity_report

    report = sparsity_report(args.folder)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    header = f"{args.folder}: format {report.format}" + (" (no hf_elsa masks)" if report.format == "plain" else "")
    config_path = os.path.join(args.folder, ELSA_CONFIG_NAME)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
        header += (
            f", method {meta.get('method')}, target {meta.get('sparsity')} ({meta.get('sparsity_type')}), "
            f"hf_elsa {meta.get('hf_elsa_version')}"
        )
    print(header)
    print(report.summary() if args.summary else report)
    return 0


# -- prune / eval / demo ----------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Model and text for ``hf-elsa prune`` / ``eval``; the defaults are the embedded SmolLM2 + Wikipedia."""

    model: str | None = field(default=None, metadata={"help": "Model folder or Hub id (default: SmolLM2-135M)."})
    text: list[str] | None = field(default=None, metadata={"help": "Text files, one document each."})
    dataset: str | None = field(default=None, metadata={"help": "datasets name or local loader/path."})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of documents held back for evaluation."})
    eval_seqlen: int = field(default=512, metadata={"help": "Window of the perplexity evaluation."})
    eval_windows: int | None = field(default=64, metadata={"help": "Held-out windows evaluated (None: all)."})


def _load_model(name: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        from .demo import load_smollm2

        return load_smollm2()
    if os.path.isfile(os.path.join(name, "elsa_config.json")):
        from .sparse_io import load_sparse_model

        model = load_sparse_model(name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(name)


def _documents(data: DataArguments):
    from .data import load_documents, split_documents

    documents = load_documents(data.text, data.dataset, data.dataset_config, text_column=data.text_column)
    return split_documents(documents, eval_fraction=data.eval_fraction)


def prune_command(args: argparse.Namespace) -> int:
    """Prune a causal LM with ELSA. Takes every ElsaConfig / TrainingArguments field as --field value."""
    from transformers import HfArgumentParser

    from .config import ElsaConfig
    from .data import token_blocks, tokenize_documents
    from .evaluation import perplexity
    from .trainer import ElsaTrainer

    parser = HfArgumentParser((DataArguments, ElsaConfig), prog="hf-elsa prune")
    data, config = parser.parse_args_into_dataclasses(args.options)
    model, tokenizer = _load_model(data.model)  # the config is validated before this, by the parser
    train_docs, eval_docs = _documents(data)
    train = token_blocks(train_docs, tokenizer, block_size=data.block_size)
    trainer = ElsaTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    ppl = perplexity(trainer.model, text=tokenize_documents(eval_docs, tokenizer), seqlen=data.eval_seqlen,
                     max_windows=data.eval_windows)
    print(f"held-out perplexity {ppl:.2f}; pruned model saved to {config.output_dir}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Perplexity of a (pruned) model on held-out text: --model DIR [--text FILES | --dataset NAME]."""
    from transformers import HfArgumentParser

    from .data import tokenize_documents
    from .evaluation import perplexity

    (data,) = HfArgumentParser(DataArguments, prog="hf-elsa eval").parse_args_into_dataclasses(args.options)
    model, tokenizer = _load_model(data.model)
    _, eval_docs = _documents(data)
    ppl = perplexity(model, text=tokenize_documents(eval_docs, tokenizer), seqlen=data.eval_seqlen,
                     max_windows=data.eval_windows, progress=True)
    print(json.dumps({"model": data.model or "SmolLM2-135M", "perplexity": ppl, "seqlen": data.eval_seqlen,
                      "windows": data.eval_windows}))
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="elsa-smollm2")


def demo_command(args: argparse.Namespace) -> int:
    """SmolLM2-135M pruned on Wikipedia text: dense vs magnitude vs Wanda vs ELSA, with a plot."""
    from .demo import run_demo

    run_demo(sparsity=args.sparsity, max_steps=args.max_steps, output_dir=args.output_dir)
    return 0


@dataclass
class MemoryArguments:
    """The model of ``hf-elsa memory``: built from its config on the meta device, no weights loaded."""

    model: str | None = field(default=None, metadata={"help": "Model folder or Hub id (default: SmolLM2-135M)."})
    json: bool = field(default=False, metadata={"help": "Print the estimate as JSON."})


def memory_command(args: argparse.Namespace) -> int:
    """Predict the memory of an ELSA run: weights, gradients, optimizer and ADMM state (ElsaConfig fields as --options)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser

    from .config import ElsaConfig
    from .memory import estimate_memory

    parser = HfArgumentParser((MemoryArguments, ElsaConfig), prog="hf-elsa memory")
    what, config = parser.parse_args_into_dataclasses(args.options)
    if what.model is None:
        from .demo import load_smollm2

        model = load_smollm2()[0]
    else:
        model_config = AutoConfig.from_pretrained(what.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    estimate = estimate_memory(model, config)
    if what.json:
        print(json.dumps({"model": what.model or "SmolLM2-135M", **estimate.to_dict()}, indent=2))
    else:
        print(f"{what.model or 'SmolLM2-135M'}: {estimate.summary()}")
    return 0


# -- the command table ------------------------------------------------------------------------------

Command = tuple[Callable[[argparse.ArgumentParser], None] | None, Callable[[argparse.Namespace], int], str]

COMMANDS: dict[str, Command] = {
    "prune": (None, prune_command, "prune a model with ELSA (ElsaConfig fields as --options)"),
    "eval": (None, eval_command, "perplexity of a model on held-out text"),
    "inspect": (_inspect_arguments, inspect_command, "print the sparsity report of a saved folder"),
    "demo": (_demo_arguments, demo_command, "prune SmolLM2 on Wikipedia text and compare with baselines"),
    "memory": (None, memory_command, "predict the memory of an ELSA run (weights, grads, optimizer, ADMM state)"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-elsa", description="Extreme sparsity for Hugging Face causal LMs (ELSA).")
    parser.add_argument("--version", action="version", version=f"hf_elsa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        # add_arguments=None: the command parses its own options (HfArgumentParser), --help included
        sub = subparsers.add_parser(name, help=help_text, description=run.__doc__, add_help=add_arguments is not None)
        if add_arguments is not None:
            add_arguments(sub)
        sub.set_defaults(_run=run, _passthrough=add_arguments is None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-elsa`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.options = extra
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        # user errors (bad folder, corrupted file) get one clear line, not a traceback
        print(f"hf-elsa {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
