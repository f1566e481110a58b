"""Which curvature estimate, with or without SAM? ELSA on SmolLM2-135M + the Wikipedia sample, at equal steps.

    python benchmarks/curvature.py --sparsities 0.7 0.9 --max_steps 150 --output_dir docs/curvature
    python benchmarks/curvature.py --importances magnitude hutchinson --sam_rhos 0 2e-4 --base_optimizer sassha
    python benchmarks/curvature.py --sparsities 0.7 --max_steps 2 --eval_windows 2 --importances fisher  # smoke
    python benchmarks/curvature.py --merge part70 part90 --output_dir all   # combine runs made in parallel

For every sparsity x importance x sam_rho: ElsaTrainer (the default recipe unless --recipe; the same training
blocks, steps, batch and learning rate for every run), then held-out perplexity. Reports the perplexity and the
seconds per optimizer step (SAM doubles the forward/backward passes; Hutchinson adds a double backward every
--hessian_interval steps). Writes results.json and results.md to --output_dir. Runs on GPU when one is present.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hf_elsa import ElsaConfig, ElsaTrainer, perplexity, sparsity_report
from hf_elsa.curvature import ESTIMATORS
from hf_elsa.showcase.benchmark import Budget

IMPORTANCES = tuple(ESTIMATORS)
from hf_elsa.data import token_blocks, tokenize_documents


def run_grid(
    load_model: Callable[[], tuple[torch.nn.Module, object]],
    train_documents: Sequence[str],
    eval_documents: Sequence[str],
    sparsities: Sequence[float] = (0.7,),
    importances: Sequence[str] = IMPORTANCES,
    sam_rhos: Sequence[float] = (0.0, 2e-4),
    budget: Budget | None = None,
    output_dir: str = "elsa_curvature",
    overrides: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One ELSA run per (sparsity, importance, sam_rho); returns the results and rewrites the reports after each.

    ``load_model()`` must return a fresh ``(model, tokenizer)``; ``overrides`` are extra ``ElsaConfig`` fields
    shared by every run (e.g. ``{"base_optimizer": "sassha", "hessian_interval": 10}``).
    """
    unknown = set(importances) - set(IMPORTANCES)
    if unknown:
        raise ValueError(f"importances: unknown {sorted(unknown)}; choose from {IMPORTANCES}.")
    budget = budget or Budget()
    overrides = dict(overrides or {})
    # every configuration is validated before the first (long) run starts
    grid = [
        (sparsity, importance, rho, _config(budget, sparsity, importance, rho, output_dir, overrides))
        for sparsity in sparsities
        for importance in importances
        for rho in sam_rhos
    ]
    _, tokenizer = load_model()
    train = token_blocks(train_documents, tokenizer, block_size=budget.block_size)
    eval_ids = tokenize_documents(eval_documents, tokenizer)
    os.makedirs(output_dir, exist_ok=True)
    results: list[dict] = []
    for sparsity, importance, rho, args in grid:
        torch.manual_seed(budget.seed)
        model, _ = load_model()
        trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        start = time.time()
        trainer.train()
        seconds_per_step = (time.time() - start) / max(trainer.state.global_step, 1)
        ppl = perplexity(model, text=eval_ids, seqlen=budget.eval_seqlen, max_windows=budget.eval_windows)
        results.append(
            {
                "sparsity": sparsity,
                "importance": importance,
                "sam_rho": rho,
                "perplexity": ppl,
                "seconds_per_step": seconds_per_step,
                "steps": trainer.state.global_step,
                "achieved_sparsity": sparsity_report(model).sparsity,
                "final_projection_removed": trainer.elsa_optimizer.final_removed,
            }
        )
        log(
            f"{importance:11s} sam_rho {rho:<8g} {100 * sparsity:3.0f}%  ppl {ppl:12.2f}  {seconds_per_step:7.2f} s/step"
        )
        write_reports(results, budget, overrides, output_dir)
    return results


def _config(budget: Budget, sparsity: float, importance: str, rho: float, output_dir: str, overrides: dict):
    fields = {
        "output_dir": os.path.join(output_dir, "runs", f"{importance}-rho{rho:g}-s{sparsity:g}"),
        "sparsity": sparsity,
        "importance": importance,
        "sam_rho": rho,
        "max_steps": budget.max_steps,
        "per_device_train_batch_size": budget.batch_size,
        "learning_rate": budget.learning_rate,
        "bf16": budget.bf16,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": max(budget.max_steps // 5, 1),
        "seed": budget.seed,
    }
    fields.update(overrides)
    return ElsaConfig(**fields)


def write_reports(results: Sequence[dict], budget: Budget, overrides: dict, output_dir: str) -> None:
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"budget": asdict(budget), "overrides": overrides, "results": list(results)}, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_table(results, budget, overrides))


def merge_reports(input_dirs: Sequence[str], output_dir: str) -> list[dict]:
    """Combine the ``results.json`` of grids run in parallel (e.g. one process per sparsity); they must share
    one budget and one set of overrides."""
    if not input_dirs:
        raise ValueError("merge_reports: no input directories given.")
    runs = []
    for directory in input_dirs:
        with open(os.path.join(directory, "results.json")) as f:
            runs.append(json.load(f))
    for directory, run in zip(input_dirs, runs):
        if (run["budget"], run["overrides"]) != (runs[0]["budget"], runs[0]["overrides"]):
            raise ValueError(
                f"merge_reports: {directory} was run with another budget or other overrides than "
                f"{input_dirs[0]}; only runs of one setting can be merged."
            )
    results = [r for run in runs for r in run["results"]]
    os.makedirs(output_dir, exist_ok=True)
    write_reports(results, Budget(**runs[0]["budget"]), runs[0]["overrides"], output_dir)
    return results


def markdown_table(results: Sequence[dict], budget: Budget, overrides: dict | None = None) -> str:
    """Rows: importance x SAM; per sparsity a perplexity column and a seconds-per-step column."""
    sparsities = list(dict.fromkeys(r["sparsity"] for r in results))
    rows = list(dict.fromkeys((r["importance"], r["sam_rho"]) for r in results))
    cell = {(r["importance"], r["sam_rho"], r["sparsity"]): r for r in results}
    extra = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items())
    lines = [
        f"Held-out perplexity ({budget.eval_seqlen}-token windows) after {budget.max_steps} ELSA steps of "
        f"{budget.batch_size}x{budget.block_size} tokens, lr {budget.learning_rate}"
        + (f"; {extra}" if extra else "")
        + ". s/step: wall-clock seconds per optimizer step.",
        "",
        "| importance | SAM rho | "
        + " | ".join(f"{100 * s:.0f}% ppl | {100 * s:.0f}% s/step" for s in sparsities)
        + " |",
        "|---|---|" + "---:|---:|" * len(sparsities),
    ]
    for importance, rho in rows:
        cells = []
        for s in sparsities:
            r = cell.get((importance, rho, s))
            cells += [f"{r['perplexity']:.1f}", f"{r['seconds_per_step']:.2f}"] if r else ["", ""]
        lines.append(f"| {importance} | {rho:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    parser.add_argument("--importances", nargs="+", default=list(IMPORTANCES), choices=IMPORTANCES)
    parser.add_argument("--sam_rhos", nargs="+", type=float, default=[0.0, 2e-4], help="0 = no SAM")
    parser.add_argument("--recipe", default="elsa")
    parser.add_argument("--base_optimizer", default="trainer", choices=["trainer", "sassha"])
    parser.add_argument("--hessian_interval", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more ElsaConfig fields")
    parser.add_argument("--output_dir", default="elsa_curvature")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="only combine the results of these runs")
    Budget.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.merge:
        merge_reports(args.merge, args.output_dir)
        return
    budget = Budget.from_args(args)
    overrides = {
        "recipe": args.recipe,
        "base_optimizer": args.base_optimizer,
        "hessian_interval": args.hessian_interval,
    }
    overrides.update(dict(_parse_override(item) for item in args.set))

    from hf_elsa.showcase.demo import load_smollm2, wikipedia_split

    train_docs, eval_docs = wikipedia_split(budget.seed)
    run_grid(
        load_smollm2,
        train_docs,
        eval_docs,
        sparsities=args.sparsities,
        importances=args.importances,
        sam_rhos=args.sam_rhos,
        budget=budget,
        output_dir=args.output_dir,
        overrides=overrides,
    )


if __name__ == "__main__":
    main()
