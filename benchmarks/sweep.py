"""Perplexity vs sparsity on SmolLM2-135M + the gensim Wikipedia sample, every method, one run.

    python benchmarks/sweep.py                                   # default CPU budget (hours on 2 cores)
    python benchmarks/sweep.py --max_steps 40 --sparsities 0.7 0.9 --methods magnitude masked_ft elsa
    python benchmarks/sweep.py --output_dir docs/benchmark       # what docs/benchmarks.md shows
    python benchmarks/sweep.py --merge part1 part2 --output_dir all   # combine runs made in parallel
    python benchmarks/sweep.py --merge new old --output_dir all       # new training rows + old one-shot rows

Writes results.json, results.md and perplexity.png to --output_dir. Runs on GPU when one is present.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_elsa.showcase.benchmark import METHODS, Budget, merge_reports, run_benchmark
from hf_elsa.showcase.demo import load_smollm2, wikipedia_split


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--nm", nargs="*", default=["2:4"], help="N:M patterns to add")
    parser.add_argument("--output_dir", default="elsa_benchmark")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="only combine the results of these runs")
    Budget.add_arguments(parser)
    args = parser.parse_args()
    if args.merge:
        merge_reports(args.merge, args.output_dir)
        return
    budget = Budget.from_args(args)
    train_docs, eval_docs = wikipedia_split(budget.seed)
    run_benchmark(
        load_smollm2,
        train_docs,
        eval_docs,
        sparsities=args.sparsities,
        methods=args.methods,
        nm_patterns=args.nm,
        budget=budget,
        output_dir=args.output_dir,
    )


if __name__ == "__main__":
    main()
