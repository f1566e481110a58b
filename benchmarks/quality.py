"""The recipe table behind the default: ELSA variants on SmolLM2 at the benchmark's CPU budget.

Each cell is one run of ``benchmarks/convergence.py`` (the sweep's data, split, seed and evaluation). Run the
cells (in parallel processes if you like, ``OMP_NUM_THREADS=1`` each), then tabulate their logs:

    python benchmarks/quality.py run TAG [convergence.py options...] > logs/TAG.log
    python benchmarks/quality.py table logs/*.log --output_dir docs/quality
    python benchmarks/quality.py table docs/quality/results.json new_logs/*.log --output_dir docs/quality   # add cells

``run`` adds the budget (100 steps of 4 x 64 tokens, 16 held-out windows of 512 tokens, fp32 on the CPU) to
the options and logs its command; ``table`` reads the ``RESULT`` and ``COMMAND`` lines of every log (and the cells
of earlier ``results.json`` files) and writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BUDGET = [
    "--max_steps", "100", "--per_device_train_batch_size", "4", "--block_size", "64", "--eval_windows", "16",
    "--use_cpu", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "25", "--disable_tqdm", "true",
]  # fmt: skip
# the fields that tell the cells apart, as table columns
COLUMNS = ("distill_weight", "admm_init", "admm_init_sparsity", "sparsity_allocation", "admm_fraction", "learning_rate")


def run(tag: str, options: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import convergence

    print("COMMAND " + " ".join(["OMP_NUM_THREADS=1 python benchmarks/quality.py run", tag, *options]), flush=True)

    convergence.main(["--method", "elsa", *BUDGET, "--output_dir", f"/tmp/quality_{tag}", "--tag", tag, *options])


def read_results(paths: list[str]) -> list[dict]:
    """The cells of run logs (their RESULT and COMMAND lines) and of earlier ``results.json`` tables."""
    results = []
    for path in paths:
        if path.endswith(".json"):
            results += json.loads(Path(path).read_text())
            continue
        lines = Path(path).read_text().splitlines()
        found = [line for line in lines if line.startswith("RESULT ")]
        if not found:
            raise ValueError(f"{path}: no RESULT line (the run did not finish)")
        result = json.loads(found[-1][len("RESULT ") :])
        commands = [line[len("COMMAND ") :] for line in lines if line.startswith("COMMAND ")]
        if commands:
            result["command"] = commands[-1]
        results.append(result)
    return results


def _options(r: dict) -> str:
    """The cell's options beyond its tag (what tells it apart), from its command."""
    command = r.get("command", "")
    return command.split(f" {r['tag']}", 1)[1].strip() if f" {r['tag']}" in command else "-"


def _pattern(r: dict) -> str:
    kind = r.get("sparsity_type") or r["config"].get("sparsity_type", "unstructured")
    return kind if kind != "unstructured" else f"{100 * r['sparsity']:.0f}%"


def table(results: list[dict]) -> str:
    # mask moved: share of the prunable weights whose kept/pruned state the mask search changed from the start's
    header = ["pattern", *COLUMNS, "perplexity", "mask moved", "s/step", "tag", "options"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(results, key=lambda r: (":" in _pattern(r), r["sparsity"], r["ppl"]))
    for r in order:
        cells = [_pattern(r)] + [str(r["config"].get(c)) for c in COLUMNS]
        moved = r.get("mask_moved_from_start")
        cells += [f"{r['ppl']:.1f}", "-" if moved is None else f"{moved:.4f}"]
        cells += [f"{r['step_s']:.2f}" if r.get("step_s") else "-", r["tag"], f"`{_options(r)}`"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one cell: TAG then convergence.py options")
    r.add_argument("tag")
    t = sub.add_parser("table", help="tabulate the logs of finished cells")
    t.add_argument("logs", nargs="+", help="run logs and/or earlier results.json files")
    t.add_argument("--output_dir", default="quality")
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        run(args.tag, rest)
        return
    results = read_results(args.logs)
    os.makedirs(args.output_dir, exist_ok=True)
    Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.output_dir, "results.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
