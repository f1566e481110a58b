"""Time of the exact projection vs one elementwise pass over all prunable SmolLM2 weights, in one run.

    python benchmarks/projection_speed.py [--sparsity 0.9] [--repeats 5] [--threads 1]

For every prunable weight of SmolLM2-135M (the 210 Linear weights, 106M entries) it times, interleaved
and repeated (medians reported): one elementwise pass (``score.abs()``, a fresh output like any
elementwise op), the old selection (``selection.prune_smallest_direct``: kthvalue + cumsum) and the new one
(``selection.prune_smallest``), per tensor ("unstructured") and per output row ("row"), and the global
allocation's exact threshold over all tensors (``GlobalBudget``: with its sampled bracket, and without one,
the plain bisection over every entry it replaced), and prints each as a multiple of the elementwise pass.
The masks (and allocations) of old and new are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _weights():
    from hf_elsa.showcase.demo import load_smollm2

    model, _ = load_smollm2()
    head = model.get_output_embeddings()
    return [m.weight.detach().abs() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def run(sparsity: float = 0.9, repeats: int = 5, threads: int = 1, scores=None) -> dict[str, float]:
    from hf_elsa.allocation import GlobalBudget, global_budget
    from hf_elsa.selection import prune_smallest
    from hf_elsa.selection import prune_smallest_direct as _prune_smallest

    torch.set_num_threads(threads)
    scores = _weights() if scores is None else scores

    def unstructured(fn):
        return [fn(s.reshape(1, -1), round(s.numel() * sparsity)) for s in scores]

    def row(fn):
        return [fn(s, round(s.shape[1] * sparsity)) for s in scores]

    for a, b in zip(unstructured(_prune_smallest), unstructured(prune_smallest)):
        assert torch.equal(a, b), "old and new unstructured masks differ"
    for a, b in zip(row(_prune_smallest), row(prune_smallest)):
        assert torch.equal(a, b), "old and new row masks differ"

    named = {str(i): s for i, s in enumerate(scores)}
    numels = {n: s.numel() for n, s in named.items()}

    def allocation(bracket: bool):
        margin = global_budget.MARGIN_SD
        global_budget.MARGIN_SD = margin if bracket else -1.0  # an empty bracket: bisection over every entry
        try:
            return GlobalBudget().tensor_sparsities(named, numels, sparsity)
        finally:
            global_budget.MARGIN_SD = margin

    assert allocation(True) == allocation(False), "global allocations with and without the bracket differ"

    cases = {
        "elementwise pass (abs)": lambda: [s.abs() for s in scores],
        "unstructured, old": lambda: unstructured(_prune_smallest),
        "unstructured, new": lambda: unstructured(prune_smallest),
        "row, old": lambda: row(_prune_smallest),
        "row, new": lambda: row(prune_smallest),
        "global allocation, old (bisection over all)": lambda: allocation(False),
        "global allocation, new (sampled bracket)": lambda: allocation(True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.sparsity, args.repeats, args.threads)
    base = result["elementwise pass (abs)"]
    print(
        f"SmolLM2-135M prunable weights, sparsity {args.sparsity}, {args.threads} thread(s), "
        f"median of {args.repeats} interleaved runs"
    )
    print("| what | seconds | x elementwise pass |")
    print("|---|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} |")
    return result


if __name__ == "__main__":
    main()
