"""Dense vs sparse inference of one sparse folder, measured in one run: ``hf-elsa bench-inference`` (docs/deployment.md).

A benchmark around the library, not part of inference: it lives with the showcase (it builds SmolLM2 folders).

``bench_inference(path)`` loads the folder (``load_sparse_model`` for an hf_elsa checkpoint, plain
``from_pretrained`` otherwise), converts a copy with :func:`to_sparse_inference`, checks that both give the
same logits and the same ``generate()`` tokens, then times dense and sparse taking turns: greedy decode with
the KV cache step by step (one forward per token, as ``generate()`` runs it) at each batch size, the prefill
of one prompt, and the weight memory of the pruned Linears. Speed-ups are medians of per-step (per-run)
ratios, tokens/s come from median step times, so load from other processes hits both sides alike.
When a layer stays dense, the result says why: its measured speed-up at each token count against the margin.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..compat import cached_forward


@dataclass
class BenchResult:
    name: str
    sparsity: float | None
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int = 0
    decode_tok_s: dict[str, dict[int, float]] = field(default_factory=dict)  # "dense"/"sparse" -> batch -> tok/s
    decode_speedup: dict[int, float] = field(default_factory=dict)  # batch -> median per-step dense/sparse time
    prefill_s: dict[str, float] = field(default_factory=dict)
    prefill_speedup: float = 1.0  # median per-run dense/sparse time
    weight_mib: dict[str, float] = field(default_factory=dict)  # pruned Linears only
    converted_layers: str = ""
    rel_logit_error: float = 0.0  # ||sparse - dense|| / ||dense|| over all logits of the batched prompt
    max_position_rel_error: float = 0.0  # the same per token position, worst position
    same_greedy_tokens: bool = True
    kernel_usage: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    margin: dict[int, float] = field(default_factory=dict)  # token count -> speed-up a layer needs to convert
    # layer -> {"converted", "speedup": {tokens: dense/sparse}, "reason"}: why each Linear converted or stayed dense
    layers: dict[str, dict] = field(default_factory=dict)

    def speedup(self, batch: int) -> float:
        return self.decode_speedup[batch]

    def to_dict(self) -> dict:
        return asdict(self)


def load_for_inference(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """An hf_elsa sparse folder through ``load_sparse_model`` (either format), any other through
    ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from ..sparse_io import ELSA_CONFIG_NAME, load_sparse_model

    if (Path(path) / ELSA_CONFIG_NAME).is_file():
        model = load_sparse_model(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def _pruned_sparsity(model) -> float | None:
    from ..inference.convert import _candidates

    layers = [m for _, m in _candidates(model, None)]
    total = sum(m.weight.numel() for m in layers)
    return sum(int(m.weight.eq(0).sum()) for m in layers) / total if total else None


def _interleaved_decode(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int):
    """Greedy decode with the KV cache, one forward per token as ``generate()`` does, the models taking
    turns step by step (which goes first alternates), so that load from elsewhere on the machine hits them
    alike. Returns ``({name: [seconds per step]}, [first model's step time / second's, per step])``."""
    names = list(models)
    steps = {name: [] for name in names}
    ratios = []
    for _ in range(repeats):
        state = {}
        for name, model in models.items():
            mask = torch.ones_like(ids)
            out, cache = cached_forward(model, ids, None, attention_mask=mask, logits_to_keep=1)
            state[name] = (cache, out.logits[:, -1].argmax(-1, keepdim=True), mask)
        for step in range(new_tokens):
            seconds = {}
            for name in names if step % 2 == 0 else names[::-1]:
                cache, token, mask = state[name]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                start = time.perf_counter()
                out, cache = cached_forward(models[name], token, cache, attention_mask=mask, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                seconds[name] = time.perf_counter() - start
                state[name] = (cache, token, mask)
            for name in names:
                steps[name].append(seconds[name])
            ratios.append(seconds[names[0]] / seconds[names[1]])
    return steps, ratios


def _interleaved_prefill(models: dict, ids: torch.Tensor, repeats: int):
    names = list(models)
    seconds = {name: [] for name in names}
    ratios = []
    for rep in range(repeats):
        now = {}
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name](ids, use_cache=True, logits_to_keep=1)
            now[name] = time.perf_counter() - start
            seconds[name].append(now[name])
        ratios.append(now[names[0]] / now[names[1]])
    return seconds, ratios


@torch.no_grad()
def bench_inference(
    path: str | os.PathLike | None = None,
    *,
    model=None,
    name: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 32,
    prefill_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = 1,
    convert_kwargs: dict | None = None,
    verbose: bool = True,
) -> BenchResult:
    """Benchmark dense vs :func:`to_sparse_inference` on the folder ``path`` (or an in-memory ``model``)."""
    from ..inference.convert import REPORT_ATTR, to_sparse_inference

    if threads:
        torch.set_num_threads(threads)
    dense = load_for_inference(path) if model is None else model.eval()
    name = name or (Path(path).name if path is not None else type(dense).__name__)
    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, vocab, (b, prompt_tokens), generator=gen) for b in batch_sizes}
    long_prompt = torch.randint(3, vocab, (1, prefill_tokens), generator=gen)

    sparse = copy.deepcopy(dense)
    kwargs = {"tokens": tuple(batch_sizes), "prefill_tokens": prefill_tokens, **(convert_kwargs or {})}
    start = time.perf_counter()
    to_sparse_inference(sparse, **kwargs)
    convert_s = time.perf_counter() - start
    report = getattr(sparse, REPORT_ATTR)
    result = BenchResult(
        name, _pruned_sparsity(dense), torch.get_num_threads(), prompt_tokens, new_tokens, prefill_tokens
    )
    result.weight_mib = {"dense": report.dense_nbytes / 2**20, "sparse": report.nbytes / 2**20}
    result.device = next(dense.parameters()).device.type
    result.margin = conversion_margin(kwargs)
    result.layers = {
        layer: {"converted": c.converted, "speedup": dict(c.speedup), "reason": c.reason}
        for layer, c in report.layers.items()
    }
    converted = [c for c in report.layers.values() if c.converted]
    result.converted_layers = f"{len(converted)}/{len(report.layers)}"
    for c in converted:
        for n, kernel in c.plan:
            key = f"{n} tok: {kernel}"
            result.kernel_usage[key] = result.kernel_usage.get(key, 0) + 1

    # same outputs: logits on the batched prompt, greedy tokens at batch 1
    ids = prompts[max(batch_sizes)]
    ref, out = dense(ids).logits, sparse(ids).logits
    result.rel_logit_error = float((out - ref).norm() / ref.norm())
    result.max_position_rel_error = float(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    greedy = {"do_sample": False, "max_new_tokens": 8, "pad_token_id": 0}
    result.same_greedy_tokens = bool(
        torch.equal(
            dense.generate(prompts[min(batch_sizes)], **greedy), sparse.generate(prompts[min(batch_sizes)], **greedy)
        )
    )

    models = {"dense": dense, "sparse": sparse}
    _interleaved_prefill(models, long_prompt, 1)  # warm-up (allocator, kernel libraries)
    _interleaved_decode(models, prompts[batch_sizes[0]], 2, 1)
    for b in batch_sizes:
        steps, ratios = _interleaved_decode(models, prompts[b], new_tokens, repeats)
        for key in models:
            result.decode_tok_s.setdefault(key, {})[b] = b / statistics.median(steps[key])
        result.decode_speedup[b] = statistics.median(ratios)
    seconds, ratios = _interleaved_prefill(models, long_prompt, 2 * repeats + 1)
    result.prefill_s = {k: statistics.median(v) for k, v in seconds.items()}
    result.prefill_speedup = statistics.median(ratios)
    if verbose:
        print(format_result(result))
        print(f"  (conversion with measurement: {convert_s:.1f} s)")
    return result


def conversion_margin(convert_kwargs: dict) -> dict[int, float]:
    """The speed-up over dense a layer needs at each token count to be converted (to_sparse_inference's rule)."""
    from ..inference.convert import to_sparse_inference

    defaults = {k: p.default for k, p in inspect.signature(to_sparse_inference).parameters.items()}
    merged = {**defaults, **convert_kwargs}
    margin = {n: merged["min_speedup"] for n in merged["tokens"]}
    if merged["prefill_tokens"] and merged["prefill_min_speedup"] is not None:
        margin.setdefault(merged["prefill_tokens"], merged["prefill_min_speedup"])
    return margin


def why_dense(r: BenchResult) -> list[str]:
    """Why Linears stayed dense: per kind of layer, the measured speed-ups (min-max over its layers) against the
    margin, or the reason when nothing was measured."""
    kept = {name: layer for name, layer in r.layers.items() if not layer["converted"]}
    if not kept:
        return []
    need = ", ".join(f"{m:.2f}x at {n} tok" for n, m in sorted(r.margin.items()))
    head = (
        f"why {len(kept)} of {len(r.layers)} Linears stayed dense: a layer converts when its best sparse kernel beats "
        f"dense by the margin at every token count ({need}); measured best sparse speed-up per layer:"
    )
    lines = [head]
    kinds: dict[str, list[dict]] = {}
    for name, layer in kept.items():
        kinds.setdefault(re.sub(r"^.*?\.\d+\.", "", name), []).append(layer)
    for kind, layers in kinds.items():
        counts = sorted({n for layer in layers for n in layer["speedup"]})
        if not counts:  # not measured: no kernel runs here, or accepts this layer
            lines.append(f"  {kind} x{len(layers)}: {layers[0]['reason'] or 'not measured'}")
            continue
        spans = []
        for n in counts:
            values = [layer["speedup"][n] for layer in layers if n in layer["speedup"]]
            spans.append(f"{n} tok {min(values):.2f}-{max(values):.2f}x (needs {r.margin.get(n, 0):.2f}x)")
        lines.append(f"  {kind} x{len(layers)}: " + ", ".join(spans))
    return lines


def format_result(r: BenchResult) -> str:
    sp = f"{100 * r.sparsity:.1f}%" if r.sparsity is not None else "?"
    lines = [
        f"{r.name}: pruned-Linear sparsity {sp}, {r.threads} thread(s), {r.converted_layers} Linears converted",
        "| | dense | sparse | sparse / dense |",
        "|---|---|---|---|",
    ]
    for b in r.decode_tok_s["dense"]:
        d, s = r.decode_tok_s["dense"][b], r.decode_tok_s["sparse"][b]
        lines.append(f"| decode tokens/s, batch {b} | {d:.1f} | {s:.1f} | {r.speedup(b):.2f}x |")
    d, s = r.prefill_s["dense"], r.prefill_s["sparse"]
    lines.append(f"| prefill seconds, 1 x {r.prefill_tokens} tokens | {d:.3f} | {s:.3f} | {r.prefill_speedup:.2f}x |")
    d, s = r.weight_mib["dense"], r.weight_mib["sparse"]
    lines.append(f"| pruned-Linear weight MiB | {d:.1f} | {s:.1f} | {s / d:.3f}x |")
    lines.append(
        f"relative logit error {r.rel_logit_error:.1e} (worst position {r.max_position_rel_error:.1e}); "
        f"same greedy tokens: {r.same_greedy_tokens}"
    )
    lines.append("kernels: " + (", ".join(f"{k} x{v}" for k, v in sorted(r.kernel_usage.items())) or "none"))
    lines += why_dense(r)
    return "\n".join(lines)


def save_results(results: list[BenchResult], folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))


USAGE = """Dense vs sparse inference (hf_elsa.to_sparse_inference), decode tokens/s, prefill and weight memory.

    python benchmarks/bench_inference.py DIR [DIR ...]          # sparse folders (hf_elsa or plain HF)
    python benchmarks/bench_inference.py --smollm2 0.5 0.7 0.9 2:4 --out docs/deployment

``--smollm2`` builds SmolLM2-135M sparse folders by one-shot magnitude pruning (the speed depends on
where the zeros are only through how many there are per row, not on how they were chosen), benchmarks
each and writes ``results.json``, ``results.md`` and ``speedup.png`` to ``--out``. Each model's dense and
sparse runs are interleaved in one process (medians of ``--repeats``), one thread by default.
"""


def make_smollm2_folder(spec: str, folder: str) -> str:
    """SmolLM2-135M pruned by magnitude to ``spec`` ("0.9" unstructured per tensor, or "2:4"), saved with masks."""
    from ..oneshot import magnitude
    from ..sparse_io import attach_sparsity
    from .demo import load_smollm2

    model, tokenizer = load_smollm2()
    if ":" in spec:
        masks = magnitude(model, 0.5, spec)
        meta = {"method": "magnitude", "sparsity": 0.5, "sparsity_type": spec}
    else:
        masks = magnitude(model, float(spec), "unstructured")
        meta = {"method": "magnitude", "sparsity": float(spec), "sparsity_type": "unstructured"}
    attach_sparsity(model, masks, meta)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(paths=(), smollm2=(), out=None, **bench_kwargs):
    """Benchmark every folder of ``paths`` and every SmolLM2 spec of ``smollm2``; returns the results."""
    results = []
    for path in paths:
        results.append(bench_inference(path, **bench_kwargs))
    if smollm2:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in smollm2:
                folder = make_smollm2_folder(spec, os.path.join(tmp, spec.replace(":", "_")))
                label = f"SmolLM2-135M {spec if ':' in spec else f'{100 * float(spec):.0f}%'}"
                results.append(bench_inference(folder, name=label, **bench_kwargs))
    if out:
        save_results(results, out)
        write_table(results, Path(out) / "results.md")
        plot(results, Path(out) / "speedup.png")
    return results


def write_table(results, path: Path) -> None:
    batches = list(results[0].decode_tok_s["dense"]) if results else []
    head = ["model", "sparsity", "Linears converted"]
    head += [f"decode tok/s b={b} dense / sparse (x)" for b in batches]
    head += ["prefill s dense / sparse", "pruned-weight MiB dense / sparse (x)", "rel. logit error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{100 * r.sparsity:.1f}%" if r.sparsity is not None else "?", r.converted_layers]
        for b in batches:
            d, s = r.decode_tok_s["dense"][b], r.decode_tok_s["sparse"][b]
            row.append(f"{d:.1f} / {s:.1f} ({r.speedup(b):.2f}x)")
        row.append(f"{r.prefill_s['dense']:.3f} / {r.prefill_s['sparse']:.3f} ({r.prefill_speedup:.2f}x)")
        wd, ws = r.weight_mib["dense"], r.weight_mib["sparse"]
        row.append(f"{wd:.0f} / {ws:.0f} ({ws / wd:.2f}x)")
        row.append(f"{r.rel_logit_error:.1e}")
        lines.append("| " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = list(results[0].decode_tok_s["dense"]) if results else []
    unstructured = sorted(
        (r for r in results if "2:4" not in r.name and r.sparsity is not None), key=lambda r: r.sparsity
    )
    for b, marker in zip(batches, "os^v"):
        ax.plot(
            [100 * r.sparsity for r in unstructured],
            [r.speedup(b) for r in unstructured],
            marker=marker,
            label=f"decode, batch {b} (unstructured)",
        )
        for r in results:
            if "2:4" in r.name:
                ax.scatter([100 * r.sparsity], [r.speedup(b)], marker="x", s=60, color="k")
                ax.annotate(f"2:4 b={b}", (100 * r.sparsity, r.speedup(b)), fontsize=7)
    ax.plot(
        [100 * r.sparsity for r in unstructured],
        [r.prefill_speedup for r in unstructured],
        "--",
        color="gray",
        label="prefill",
    )
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("sparsity of the pruned Linears (%)")
    ax.set_ylabel("speed-up over dense (end to end)")
    ax.set_title(plot_title(results))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_title(results) -> str:
    """The models' name (what their names share, e.g. "SmolLM2-135M"), device, threads."""
    names = [r.name for r in results]
    shared = os.path.commonprefix(names).strip(" _-/%") if len(names) > 1 else (names[0] if names else "")
    who = shared or f"{len(names)} models"
    threads = results[0].threads if results else 1
    return f"{who}, {(results[0].device if results else 'cpu').upper()}, {threads} thread{'s' * (threads != 1)}"


def main(argv=None, prog: str | None = None):
    """Command line: ``bench_inference.py DIR ...`` or ``--smollm2 0.9 2:4 --out FOLDER`` (also for ``hf-elsa``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=USAGE.splitlines()[0], epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", help="sparse model folders")
    parser.add_argument("--smollm2", nargs="*", default=[], help="build SmolLM2 folders: 0.5 0.7 0.9 2:4 ...")
    parser.add_argument("--out", help="write results.json, results.md and speedup.png here")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.paths and not args.smollm2:
        parser.error("give sparse folders or --smollm2 SPEC ...")
    return run(
        args.paths,
        args.smollm2,
        args.out,
        batch_sizes=tuple(args.batch_sizes),
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        prefill_tokens=args.prefill_tokens,
        repeats=args.repeats,
        threads=args.threads,
    )
