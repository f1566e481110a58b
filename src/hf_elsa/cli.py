"""The ``hf-elsa`` command: one subcommand per function.

    hf-elsa inspect DIR [--json] [--summary]

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


# -- the command table ------------------------------------------------------------------------------

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]

COMMANDS: dict[str, Command] = {
    "inspect": (_inspect_arguments, inspect_command, "print the sparsity report of a saved folder"),
    # "prune": (...), "eval": (...), "demo": (...)  -- added by their modules
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-elsa", description="Extreme sparsity for Hugging Face causal LMs (ELSA).")
    parser.add_argument("--version", action="version", version=f"hf_elsa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=run.__doc__)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-elsa`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
