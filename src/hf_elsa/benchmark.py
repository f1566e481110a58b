"""Perplexity against sparsity for ELSA and the baselines, in one run (used by the demo and benchmarks/).

Every method starts from a fresh copy of the dense model, uses the same training blocks (ELSA and
masked fine-tuning: the same steps, batch and learning rate) and the same held-out windows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .data import token_blocks, tokenize_documents
from .evaluation import perplexity
from .sparse_io import sparsity_report

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "masked_ft", "elsa")
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (one-shot)",
    "wanda": "Wanda (one-shot)",
    "sparsegpt": "SparseGPT (one-shot)",
    "masked_ft": "magnitude + masked fine-tuning",
    "elsa": "ELSA",
}


@dataclass
class Budget:
    """What each method may spend. Training methods get identical steps, batches and learning rate."""

    # defaults: ~150 steps of 4 x 256 tokens on a GPU; on a CPU the budget that runs in ~1.5 hours on
    # 2 cores (docs/benchmarks.md measured it): 100 steps of 4 x 64 tokens, 16 evaluation windows
    max_steps: int = field(default_factory=lambda: 150 if torch.cuda.is_available() else 100)
    batch_size: int = 4
    block_size: int = field(default_factory=lambda: 256 if torch.cuda.is_available() else 64)
    learning_rate: float = 1e-4
    calibration_samples: int = 128
    eval_seqlen: int = 512
    eval_windows: int | None = field(default_factory=lambda: 64 if torch.cuda.is_available() else 16)
    seed: int = 0
    # bf16 autocast only on GPU: on CPUs without native bf16 it is ~25x slower than fp32 (measured here)
    bf16: bool = field(default_factory=torch.cuda.is_available)
    elsa_overrides: dict = field(default_factory=dict)

    @classmethod
    def add_arguments(cls, parser) -> None:
        """One ``--field`` option per budget field (all but ``elsa_overrides``) on an argparse parser."""
        for name, value in vars(cls()).items():
            if isinstance(value, bool):
                parser.add_argument(f"--{name}", type=lambda v: v.lower() in ("1", "true", "yes"), default=value)
            elif name != "elsa_overrides":
                parser.add_argument(f"--{name}", type=type(value) if value is not None else int, default=value)

    @classmethod
    def from_args(cls, args) -> Budget:
        """The budget parsed by the options of :meth:`add_arguments`."""
        return cls(**{k: getattr(args, k) for k in vars(cls()) if k != "elsa_overrides"})


@dataclass
class Result:
    method: str
    sparsity_type: str
    sparsity: float
    perplexity: float
    seconds: float
    achieved_sparsity: float


def _train(model, tokenizer, train, method: str, sparsity: float, sparsity_type: str, budget: Budget, output_dir: str):
    from .config import ElsaConfig
    from .trainer import ElsaTrainer

    overrides = dict(budget.elsa_overrides) if method == "elsa" else {"admm_fraction": 0.0}
    args = ElsaConfig(
        output_dir=output_dir,
        sparsity=sparsity,
        sparsity_type=sparsity_type,
        max_steps=budget.max_steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        bf16=budget.bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(budget.max_steps // 5, 1),
        seed=budget.seed,
        **overrides,
    )
    ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()


def run_benchmark(
    load_model: Callable[[], tuple[torch.nn.Module, object]],
    train_documents: Sequence[str],
    eval_documents: Sequence[str],
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9),
    methods: Sequence[str] = METHODS,
    nm_patterns: Sequence[str] = ("2:4",),
    budget: Budget | None = None,
    output_dir: str = "elsa_benchmark",
    log: Callable[[str], None] = print,
    on_model: Callable[[Result, torch.nn.Module], None] | None = None,
) -> list[Result]:
    """Run every method at every sparsity (and N:M pattern); returns the results and writes reports.

    ``load_model()`` must return a fresh ``(model, tokenizer)`` each call. ``on_model(result, model)``
    is called with each pruned model before it is dropped (e.g. to save one).
    """
    from . import oneshot

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)}; choose from {METHODS}.")
    budget = budget or Budget()
    _, tokenizer = load_model()
    train = token_blocks(train_documents, tokenizer, block_size=budget.block_size)
    calibration = token_blocks(
        train_documents,
        tokenizer,
        block_size=budget.block_size,
        num_blocks=budget.calibration_samples,
        seed=budget.seed,
    )
    eval_ids = tokenize_documents(eval_documents, tokenizer)
    settings = [("unstructured", s) for s in sparsities] + [(p, None) for p in nm_patterns]
    results: list[Result] = []
    os.makedirs(output_dir, exist_ok=True)

    for method in methods:
        for sparsity_type, sparsity in settings if method != "dense" else [("dense", 0.0)]:
            torch.manual_seed(budget.seed)
            model, _ = load_model()
            start = time.time()
            level = sparsity if sparsity is not None else 0.5
            if method in ("magnitude", "wanda", "sparsegpt"):
                prune = getattr(oneshot, method)
                kwargs = {} if method == "magnitude" else {"calibration": calibration, "progress": False}
                prune(model, sparsity=level, sparsity_type=sparsity_type, **kwargs)
            elif method in ("masked_ft", "elsa"):
                _train(
                    model,
                    tokenizer,
                    train,
                    method,
                    level,
                    sparsity_type,
                    budget,
                    os.path.join(output_dir, "runs", f"{method}-{sparsity_type.replace(':', '_')}-{level}"),
                )
            seconds = time.time() - start
            ppl = perplexity(model, text=eval_ids, seqlen=budget.eval_seqlen, max_windows=budget.eval_windows)
            label = sparsity_type if sparsity is None else f"{100 * level:.0f}%"
            result = Result(
                method,
                sparsity_type,
                0.0 if method == "dense" else level,
                ppl,
                seconds,
                sparsity_report(model).sparsity,
            )
            results.append(result)
            log(f"{LABELS[method]:32s} {label:>6s}  ppl {ppl:12.2f}  ({seconds:6.0f} s)")
            write_reports(results, budget, output_dir)
            if on_model is not None:
                on_model(result, model)
    return results


def merge_reports(input_dirs: Sequence[str], output_dir: str) -> list[Result]:
    """Combine the ``results.json`` of runs made in parallel (e.g. one process per sparsity subset).

    The runs must share one budget; results are ordered by method, a method/setting measured twice
    (dense in every part) is kept once. Writes the combined reports to ``output_dir``.
    """
    budget, merged = None, {}
    for directory in input_dirs:
        with open(os.path.join(directory, "results.json")) as f:
            data = json.load(f)
        if budget is not None and data["budget"] != budget:
            raise ValueError(
                f"merge_reports: {directory} was run with a different budget: {data['budget']} vs {budget}"
            )
        budget = data["budget"]
        for r in data["results"]:
            merged.setdefault((r["method"], r["sparsity_type"], r["sparsity"]), Result(**r))
    if budget is None:
        raise ValueError("merge_reports: no input directories given.")
    results = sorted(merged.values(), key=lambda r: METHODS.index(r.method))
    os.makedirs(output_dir, exist_ok=True)
    write_reports(results, Budget(**budget), output_dir)
    return results


def write_reports(results: Sequence[Result], budget: Budget, output_dir: str) -> None:
    """``results.json``, ``results.md`` (a table) and ``perplexity.png`` (if matplotlib is installed)."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"budget": asdict(budget), "results": [asdict(r) for r in results]}, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_table(results, budget))
    try:
        plot(results, os.path.join(output_dir, "perplexity.png"))
    except ImportError:
        pass


def _column(r: Result) -> str:
    return r.sparsity_type if r.sparsity_type not in ("unstructured", "dense") else f"{100 * r.sparsity:.0f}%"


def markdown_table(results: Sequence[Result], budget: Budget) -> str:
    # unstructured sparsities ascending, then N:M patterns (merged parts may list them in any order)
    ordered = sorted((r for r in results if r.method != "dense"), key=lambda r: (":" in r.sparsity_type, r.sparsity))
    columns = list(dict.fromkeys(_column(r) for r in ordered))
    dense = next((r.perplexity for r in results if r.method == "dense"), None)
    lines = [
        f"Held-out perplexity ({budget.eval_seqlen}-token windows; training methods: {budget.max_steps} steps of "
        f"{budget.batch_size}x{budget.block_size} tokens, lr {budget.learning_rate}).",
        "",
    ]
    if dense is not None:
        lines += [f"Dense: {dense:.2f}", ""]
    lines += ["| method | " + " | ".join(columns) + " | seconds (total) |", "|---" * (len(columns) + 2) + "|"]
    for method in dict.fromkeys(r.method for r in results if r.method != "dense"):
        row = {_column(r): r for r in results if r.method == method}
        cells = [f"{row[c].perplexity:.1f}" if c in row else "" for c in columns]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {sum(r.seconds for r in row.values()):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        points = sorted(
            (r.sparsity, r.perplexity)
            for r in results
            if r.method == method and r.sparsity_type in ("unstructured", "dense")
        )
        nm = [
            (r.sparsity, r.perplexity, r.sparsity_type)
            for r in results
            if r.method == method and ":" in r.sparsity_type
        ]
        if method == "dense":
            ax.axhline(points[0][1], color="gray", linestyle=":", label="dense")
            continue
        line = ax.plot([p[0] * 100 for p in points], [p[1] for p in points], marker="o", label=LABELS[method])
        for s, ppl, pattern in nm:
            ax.scatter([s * 100], [ppl], marker="s", facecolors="none", edgecolors=line[0].get_color())
            ax.annotate(pattern, (s * 100, ppl), textcoords="offset points", xytext=(4, 2), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)  [squares: N:M patterns]")
    ax.set_ylabel("held-out perplexity (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
