"""The ``hf-elsa`` command: one subcommand per function.

    hf-elsa prune [--model_name_or_path M] [--text_files F ... | --dataset_name D ...] --output_dir OUT \
        [--method elsa|PRUNER] [--compressed] [--config run.yaml] [ElsaConfig fields]
    hf-elsa eval [--model_name_or_path OUT] [--text_files F ... | --dataset_name D --dataset_split test]
    hf-elsa inspect DIR [--json] [--summary] [--chart]
    hf-elsa demo [--sparsity 0.5] [--max_steps 32]
    hf-elsa memory [--model_name_or_path M] [--json] [ElsaConfig fields, e.g. --elsa_l true]
    hf-elsa bench-inference DIR [DIR ...] | --smollm2 0.5 0.9 [--out FOLDER]

    # several processes (GPUs): the command itself is the launcher's script
    accelerate launch [--config_file ddp.yaml] --num_processes N -m hf_elsa prune ...
    torchrun --nproc_per_node N -m hf_elsa prune ...

``PRUNER``: a one-shot pruner's registered name (``hf_elsa.oneshot.PRUNERS``). ``prune`` and ``eval`` take the
argument set of ``examples/prune.py`` (:mod:`hf_elsa.scripts`).

Each subcommand is an entry of ``COMMANDS``: ``name -> Command(add_arguments, run, help)``. ``add_arguments``
fills the subcommand's ``argparse`` parser (None: the command parses its own options with an
``HfArgumentParser``, ``--help`` included); ``run(args)`` does the work and returns the exit status. A new
subcommand is one function and one entry (or :func:`register`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ._allocator import keep_freed_memory

# -- inspect ----------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a saved model folder (hf_elsa dense or compressed, or plain)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--summary", action="store_true", help="print the totals only, not one line per tensor")
    parser.add_argument("--chart", action="store_true", help="print the per-layer chart and the totals only")


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # the first numbered component: "model.layers.3" of "model.layers.3.mlp..."


def layer_sparsity(report) -> list[tuple[str, int, int]]:
    """``(layer, zeros, numel)`` per numbered block (``model.layers.N``, ``transformer.h.N``...), in order;
    tensors outside numbered blocks are grouped under their own name."""
    layers: dict[str, list[int]] = {}
    for t in report.tensors:
        match = _LAYER.match(t.name)
        key = match.group(1) if match else t.name.removesuffix(".weight")
        totals = layers.setdefault(key, [0, 0])
        totals[0] += t.zeros
        totals[1] += t.numel
    return [(name, zeros, numel) for name, (zeros, numel) in layers.items()]


def _bar_characters() -> tuple[str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "\u2588\u2591".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "#", "."
    return "\u2588", "\u2591"


def layer_chart(report, width: int = 40) -> str:
    """A text bar per layer: the share of zeros in its pruned (or prunable) weights."""
    rows = layer_sparsity(report)
    if not rows:
        return "(no prunable tensors)"
    full, empty = _bar_characters()
    name_width = max(len(name) for name, _, _ in rows)
    lines = [f"{'layer':<{name_width}}  sparsity (each {full} = {100 / width:.1f}%)"]
    for name, zeros, numel in rows:
        share = zeros / max(numel, 1)
        filled = round(share * width)
        lines.append(f"{name:<{name_width}}  {full * filled}{empty * (width - filled)} {100 * share:6.2f}%")
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    """Print the sparsity of a saved folder, read from its safetensors files (the model is not built)."""
    from .sparse_io import ELSA_CONFIG_NAME, sparsity_report

    try:
        report = sparsity_report(args.folder)
        meta = None
        config_path = os.path.join(args.folder, ELSA_CONFIG_NAME)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError(f"{config_path} does not hold a JSON object.")
    except Exception as exc:  # noqa: BLE001 - a malformed folder is a user error: one line, no traceback
        print(f"hf-elsa inspect: error: {args.folder}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    if args.json:
        data = report.to_dict()
        data["layers"] = {name: zeros / max(numel, 1) for name, zeros, numel in layer_sparsity(report)}
        print(json.dumps(data, indent=2))
        return 0
    header = f"{args.folder}: format {report.format}" + (" (no hf_elsa masks)" if report.format == "plain" else "")
    if meta is not None:
        header += (
            f", method {meta.get('method')}, target {meta.get('sparsity')} ({meta.get('sparsity_type')}), "
            f"hf_elsa {meta.get('hf_elsa_version')}"
        )
    print(header)
    if args.summary:
        print(report.summary())
    elif args.chart:
        print(layer_chart(report))
        print(report.summary())
    else:
        print(str(report).removesuffix(report.summary()).rstrip())
        print(layer_chart(report))
        print(report.summary())
    return 0


# -- prune / eval -----------------------------------------------------------------------------------


def _prune_parser():
    from .config import ElsaConfig
    from .scripts import DataArguments, ElsaArgumentParser, ModelArguments, RunArguments

    parser = ElsaArgumentParser(
        (ElsaConfig, ModelArguments, DataArguments, RunArguments),
        prog="hf-elsa prune",
        description=textwrap.fill(
            "Prune a causal LM with ELSA (or a one-shot baseline with --method), evaluate it and the dense model on "
            "the same held-out windows, and save the sparse model with its masks and model card: --output_dir holds "
            "the model only (no Trainer checkpoints unless --save_strategy steps/epoch asks for them).",
            100,
        ),
        epilog=PRUNE_EPILOG,
        formatter_class=_DefaultsAndRawEpilog,
    )
    # the output folder is the model a user ships: a Trainer checkpoint (optimizer state, ~2x the weights in fp32)
    # only when asked for; --save_strategy on the command line or in --config overrides this default
    parser.set_defaults(save_strategy="no")
    return parser


class _DefaultsAndRawEpilog(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HfArgumentParser's "(default: ...)" after each option, and the epilog's lines as written."""


PRUNE_EPILOG = """several processes (GPUs, one per process): the command is the launcher's script, options unchanged
  accelerate launch --num_processes N -m hf_elsa prune --model_name_or_path M ... --bf16
  torchrun --nproc_per_node N -m hf_elsa prune ...
  (DDP: the global batch is N x --per_device_train_batch_size; FSDP2: pass accelerate an FSDP config,
  e.g. examples/accelerate_configs/fsdp2.yaml of the repository; --method elsa only; the summary prints once)"""


def prune_command(args: argparse.Namespace) -> int:
    """Prune a causal LM with ELSA or a one-shot baseline; options: ``hf-elsa prune --help``."""
    from .scripts import run_prune

    config, model_args, data, run = _prune_parser().parse_args_and_config(args.options)
    result = run_prune(model_args, data, run, config)  # the options were validated before any model load
    if config.process_index != 0:  # under accelerate launch / torchrun: one summary, from the main process
        return 0
    for note in result.notes:
        print(f"[hf-elsa prune] {note}")
    if result.perplexity is not None:
        dense = f", dense {result.dense_perplexity:.2f} on the same windows" if result.dense_perplexity else ""
        print(f"[hf-elsa prune] held-out perplexity {result.perplexity:.2f}{dense} ({result.protocol})")
    else:
        print("[hf-elsa prune] no held-out text (--eval_fraction 0): not evaluated")
    print(f"[hf-elsa prune] {result.method} model saved to {result.output_dir} ({result.save_dtype} weights)")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Perplexity of a (pruned) model on exactly the text given: every --text_files file, or one
    --dataset_split of a dataset; default: the embedded sample's held-out articles."""
    from .evaluation import perplexity
    from .scripts import (
        DataArguments,
        ElsaArgumentParser,
        ModelArguments,
        TextColumnArguments,
        eval_windows,
        load_model_and_tokenizer,
        load_text,
    )

    parser = ElsaArgumentParser(
        (ModelArguments, DataArguments, TextColumnArguments), prog="hf-elsa eval", description=eval_command.__doc__
    )
    model_args, data, _ = parser.parse_args_and_config(args.options)
    model, tokenizer = load_model_and_tokenizer(model_args)
    text = load_text(data, tokenizer, "eval")
    held = eval_windows(text.eval, data, model)
    if held is None:
        raise ValueError("the evaluation text is empty.")
    ppl = perplexity(model, text=held.ids, seqlen=held.seqlen, max_windows=held.windows, progress=True)
    scored = held.protocol(text.how)
    print(f"[hf-elsa eval] scored: {scored}, {int(held.ids.numel()):,} tokens; {_what_eval_includes(data)}",
          file=sys.stderr)  # fmt: skip
    print(json.dumps({
        "model": model_args.model_name_or_path or "SmolLM2-135M-Instruct", "perplexity": ppl, "text": text.how,
        "scored": scored, "tokens": int(held.ids.numel()), "seqlen": held.seqlen, "windows": held.windows,
        **({"note": held.note} if held.note else {}),
    }))  # fmt: skip
    return 0


def _what_eval_includes(data) -> str:
    """What a reader must know about the score: eval holds nothing back, so text the model trained on counts too."""
    if data.text_files or data.dataset_name or data.data_files:
        return (
            "every token of it, none held back: text the model was trained on is scored too (hf-elsa prune "
            "records its held-out score in elsa_config.json)"
        )
    return "the embedded Wikipedia sample's held-out articles, which hf-elsa prune (default --eval_fraction) does not train on"


# -- demo / memory ----------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max_steps", type=int, default=32)
    parser.add_argument("--output_dir", default="elsa-smollm2")


def demo_command(args: argparse.Namespace) -> int:
    """SmolLM2-135M pruned on Wikipedia text: dense vs magnitude vs Wanda vs ELSA, with a plot."""
    from .showcase.demo import run_demo

    run_demo(sparsity=args.sparsity, max_steps=args.max_steps, output_dir=args.output_dir)
    return 0


@dataclass
class MemoryArguments:
    """The model of ``hf-elsa memory``: built from its config on the meta device, no weights loaded."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model folder or Hub id (default: SmolLM2-135M).", "aliases": ["--model"]},
    )
    json: bool = field(default=False, metadata={"help": "Print the estimate as JSON."})


def memory_command(args: argparse.Namespace) -> int:
    """Predict the memory of an ELSA run: weights, gradients, optimizer and ADMM state (ElsaConfig fields as --options)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import ElsaConfig
    from .memory import estimate_memory
    from .scripts import ElsaArgumentParser, check_model_source

    parser = ElsaArgumentParser((MemoryArguments, ElsaConfig), prog="hf-elsa memory")
    what, config = parser.parse_args_and_config(args.options)
    name = what.model_name_or_path
    if name is None:
        from .showcase.demo import load_smollm2

        model = load_smollm2()[0]
    else:
        check_model_source(name)
        model_config = AutoConfig.from_pretrained(os.path.expanduser(name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    estimate = estimate_memory(model, config)
    if what.json:
        print(json.dumps({"model": name or "SmolLM2-135M", **estimate.to_dict()}, indent=2))
    else:
        print(f"{name or 'SmolLM2-135M'}: {estimate.summary()}")
    return 0


def bench_inference_command(args: argparse.Namespace) -> int:
    """Measure a sparse folder (or SmolLM2 pruned on the fly) dense vs sparse: hf-elsa bench-inference DIR ..."""
    from .showcase.inference_bench import main as bench_main

    _check_bench_folders(args.options)
    result = bench_main(args.options, prog="hf-elsa bench-inference")
    return result if isinstance(result, int) else 0


def _check_bench_folders(options: Sequence[str]) -> None:
    """A folder argument that does not exist says so, before anything is built or measured (transformers would
    read a missing path as a malformed Hub repo id: "Repo id must be in the form ...")."""
    from .loading import looks_like_path

    after_out = False  # --out names a folder to create: it may not exist yet
    for option in options:
        if after_out or option.startswith("-"):
            after_out = option == "--out"
            continue
        if looks_like_path(option) and not os.path.exists(os.path.expanduser(option)):
            raise FileNotFoundError(f"{option}: folder not found (a sparse model folder to measure).")


# -- the command table ------------------------------------------------------------------------------


class Command(NamedTuple):
    """A subcommand: ``add_arguments(parser)`` (None: ``run`` parses ``args.options`` itself), ``run(args) ->
    exit status``, and the one-line help."""

    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: dict[str, Command] = {
    "prune": Command(None, prune_command, "prune a model with ELSA or a one-shot baseline (--help: every option)"),
    "eval": Command(None, eval_command, "perplexity of a model on exactly the text or split given"),
    "inspect": Command(_inspect_arguments, inspect_command, "print the sparsity report of a saved folder"),
    "demo": Command(_demo_arguments, demo_command, "prune SmolLM2 on Wikipedia text and compare with baselines"),
    "memory": Command(
        None, memory_command, "predict the memory of an ELSA run (weights, grads, optimizer, ADMM state)"
    ),
    "bench-inference": Command(
        None, bench_inference_command, "decode tokens/s, prefill and weight memory: dense vs to_sparse_inference"
    ),
}


def register(name: str, run: Callable[[argparse.Namespace], int], help: str, add_arguments=None) -> None:
    """Add a subcommand (``add_arguments=None``: ``run`` parses ``args.options`` itself)."""
    COMMANDS[name] = Command(add_arguments, run, help)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-elsa", description="Extreme sparsity for Hugging Face causal LMs (ELSA).")
    parser.add_argument("--version", action="version", version=f"hf_elsa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        # add_arguments=None: the command parses its own options (HfArgumentParser), --help included
        passthrough = command.add_arguments is None
        sub = subparsers.add_parser(name, help=command.help, description=command.run.__doc__, add_help=not passthrough)
        if not passthrough:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _passthrough=passthrough)
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
    import torch

    if not torch.cuda.is_available():  # CPU training frees and re-allocates the same large blocks every step
        keep_freed_memory()
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        # user errors (bad option value, missing folder, corrupted file, missing extra) get one clear line
        print(f"hf-elsa {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
