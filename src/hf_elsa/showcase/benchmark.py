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

from ..data import token_blocks, tokenize_documents
from ..evaluation import perplexity
from ..sparse_io import sparsity_report

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "masked_ft", "elsa")
TRAINED = ("masked_ft", "elsa")
# what only the training methods spend: a budget change here leaves the dense and one-shot rows valid
TRAINING_FIELDS = ("max_steps", "batch_size", "learning_rate", "elsa_overrides")
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
    learning_rate: float | None = None  # None: the recipe's (ELSA's), given to masked fine-tuning too
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
                kind = float if name == "learning_rate" else (type(value) if value is not None else int)
                parser.add_argument(f"--{name}", type=kind, default=value)

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


def _bar_only_callback(description: str):
    """The Trainer's progress bar, named, without the log dictionaries it prints under it."""
    from transformers import ProgressCallback

    class BarOnly(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(description)

        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    return BarOnly()


def _train(
    model,
    tokenizer,
    train,
    method: str,
    sparsity: float,
    sparsity_type: str,
    budget: Budget,
    output_dir: str,
    progress: bool = False,
):
    from transformers import PrinterCallback, ProgressCallback

    from ..config import ElsaConfig
    from ..trainer import ElsaTrainer

    # masked fine-tuning: magnitude pruning at step 0, then the same steps, data and learning rate as ELSA
    overrides = (
        dict(budget.elsa_overrides)
        if method == "elsa"
        else {"admm_fraction": 0.0, "admm_init": "magnitude", "distill_weight": 0.0}
    )
    if budget.learning_rate is not None:  # else the recipe's, resolved by ElsaConfig at this sparsity
        overrides["learning_rate"] = budget.learning_rate
    args = ElsaConfig(
        output_dir=output_dir,
        sparsity=sparsity,
        sparsity_type=sparsity_type,
        max_steps=budget.max_steps,
        per_device_train_batch_size=budget.batch_size,
        bf16=budget.bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(budget.max_steps // 5, 1),
        seed=budget.seed,
        # the warm start calibrates on as many blocks as the one-shot baselines do (the demo: 32)
        admm_init_samples=budget.calibration_samples,
        **overrides,
    )
    trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    for callback in (PrinterCallback, ProgressCallback):  # logs stay in trainer.state.log_history, not on screen
        trainer.remove_callback(callback)
    if progress:
        trainer.add_callback(_bar_only_callback(f"{LABELS[method]} (training)"))
    trainer.train()


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
    progress: bool = False,
) -> list[Result]:
    """Run every method at every sparsity (and N:M pattern); returns the results and writes reports.

    ``load_model()`` must return a fresh ``(model, tokenizer)`` each call. ``on_model(result, model)``
    is called with each pruned model before it is dropped (e.g. to save one). ``progress``: one progress bar
    per phase (calibration or training, then evaluation); the Trainer's log lines are never printed.
    """
    from .. import oneshot

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
            if method in oneshot.PRUNERS:
                prune = oneshot.PRUNERS.get(method)
                kwargs = {"calibration": calibration, "progress": progress} if prune.requires_calibration else {}
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
                    progress=progress,
                )
            seconds = time.time() - start
            ppl = perplexity(
                model, text=eval_ids, seqlen=budget.eval_seqlen, max_windows=budget.eval_windows, progress=progress
            )
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

    The runs share the first run's budget; results are ordered by method, and a method/setting measured
    twice (dense in every part) is kept from the first run that has it. A later run whose budget differs
    only in what training spends (``TRAINING_FIELDS``) contributes its untrained rows (dense and the
    one-shot pruners, which that does not change), e.g. when only the training rows were re-run.
    Writes the combined reports to ``output_dir``.
    """
    budget, merged = None, {}
    for directory in input_dirs:
        with open(os.path.join(directory, "results.json")) as f:
            data = json.load(f)
        rows = data["results"]
        if budget is not None and data["budget"] != budget:
            differ = {k for k in budget.keys() | data["budget"].keys() if budget.get(k) != data["budget"].get(k)}
            if not differ <= set(TRAINING_FIELDS):
                raise ValueError(
                    f"merge_reports: {directory} was run with a different budget ({sorted(differ)}): "
                    f"{data['budget']} vs {budget}"
                )
            rows = [r for r in rows if r["method"] not in TRAINED]
        budget = budget or data["budget"]
        for r in rows:
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
        (
            f"Held-out perplexity ({budget.eval_seqlen}-token windows; training methods: {budget.max_steps} steps of "
            f"{budget.batch_size}x{budget.block_size} tokens, lr {budget.learning_rate or 'of the recipe'})."
        ),
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


def _categories(results: Sequence[Result]) -> list[str]:
    """x positions: unstructured sparsities ascending, then N:M patterns."""
    pruned = sorted((r for r in results if r.method != "dense"), key=lambda r: (":" in r.sparsity_type, r.sparsity))
    return list(dict.fromkeys(_column(r) for r in pruned))


def _color(method: str):
    import matplotlib

    return matplotlib.colormaps["tab10"](METHODS.index(method) % 10)


def plot(results: Sequence[Result], path: str) -> str | None:
    """``perplexity.png``: a bar chart for one setting; for several, perplexity (log) and ratio to dense.

    Returns which was drawn (``"bars"`` or ``"sweep"``), None when there is nothing but dense yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = _categories(results)
    if not categories:  # dense only so far
        return None
    dense = next((r.perplexity for r in results if r.method == "dense"), None)
    kind = "bars" if len(categories) == 1 else "sweep"
    fig = _bar_chart(plt, results, categories[0], dense) if kind == "bars" else _sweep(plt, results, categories, dense)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return kind


def _bar_chart(plt, results: Sequence[Result], setting: str, dense: float | None):
    """One sparsity: a bar per method, its perplexity written on it, dense as a dotted line."""
    rows = [r for r in results if r.method != "dense" and _column(r) == setting]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [LABELS[r.method].replace(" + ", " +\n").replace(" (", "\n(") for r in rows]
    values = [r.perplexity for r in rows]
    bars = ax.bar(range(len(rows)), values, color=[_color(r.method) for r in rows])
    for bar, value in zip(bars, values):
        text = f"{value:,.1f}" if value < 1e5 else f"{value:.2g}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
    everything = values + ([dense] if dense else [])
    if max(everything) / max(min(everything), 1e-9) > 30:
        ax.set_yscale("log")
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle=":", label=f"dense ({dense:.2f})")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("held-out perplexity" + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.set_title(f"{setting} sparsity" if setting.endswith("%") else f"{setting} sparsity pattern", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_ylim(top=ax.get_ylim()[1] * (1.6 if ax.get_yscale() == "log" else 1.08))
    return fig


def _sweep(plt, results: Sequence[Result], categories: list[str], dense: float | None):
    """Left: perplexity (log) per setting, unstructured sparsities as lines and N:M patterns as their own
    ticks (squares). Right: the same divided by dense, the axis cut where the methods worth comparing are
    (points above it are drawn on the top edge with their value), so close methods stay apart."""
    unstructured = [c for c in categories if c.endswith("%")]
    panels = 2 if dense else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    methods = [m for m in dict.fromkeys(r.method for r in results) if m != "dense"]
    ratio_top = None
    if dense:
        elsa = [r.perplexity / dense for r in results if r.method == "elsa"]
        ratios = sorted(r.perplexity / dense for r in results if r.method != "dense")
        ratio_top = 10 * max(elsa) if elsa else 10 * ratios[len(ratios) // 2]
    for index, ax in enumerate(axes[0]):
        scale = 1.0 if index == 0 else dense
        clipped_at: dict[int, int] = {}  # clipped labels so far per x, stacked downwards
        for k, method in enumerate(methods):
            shift = (k - (len(methods) - 1) / 2) * 0.07  # N:M squares side by side, not on top of each other
            rows = {_column(r): r.perplexity / scale for r in results if r.method == method}
            xs = [i for i, c in enumerate(categories) if c in rows and c in unstructured]
            ys = [rows[categories[i]] for i in xs]
            nm = [i for i, c in enumerate(categories) if c in rows and c not in unstructured]
            color = _color(method)
            if index == 1:  # clip to the readable range, mark the clipped points
                clipped = [(i, y) for i, y in zip(xs, ys) if y > ratio_top] + [
                    (i, rows[categories[i]]) for i in nm if rows[categories[i]] > ratio_top
                ]
                for i, y in clipped:
                    x = i if i in xs else i + shift
                    ax.scatter([x], [ratio_top], marker="^", color=color, clip_on=False, zorder=3)
                    row = clipped_at.get(i, 0)
                    clipped_at[i] = row + 1
                    ax.annotate(f"{y:,.0f}x", (i, ratio_top), xytext=(6, -10 - 9 * row), textcoords="offset points",
                                fontsize=7, color=color)  # fmt: skip
                ys = [min(y, ratio_top) for y in ys]
            ax.plot(xs, ys, marker="o", color=color, label=LABELS[method])
            for i in nm:
                y = rows[categories[i]] if index == 0 else min(rows[categories[i]], ratio_top)
                ax.scatter([i + shift], [y], marker="s", s=45, color=color, zorder=3)
        if len(unstructured) < len(categories):
            ax.axvline(len(unstructured) - 0.5, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(categories)), [c if c in unstructured else f"{c}\n(N:M)" for c in categories])
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("sparsity")
        if index == 0:
            if dense is not None:
                ax.axhline(dense, color="gray", linestyle=":", label=f"dense ({dense:.2f})")
            ax.set_ylabel("held-out perplexity (log)")
            ax.legend(fontsize=8)
        else:
            ax.axhline(1.0, color="gray", linestyle=":")
            ax.set_ylim(0.9, ratio_top)
            ax.set_ylabel("perplexity / dense perplexity (log)")
            ax.set_title(
                f"ratio to dense, cut at {ratio_top:,.0f}x (triangles: above the cut, value written)", fontsize=9
            )
    return fig
