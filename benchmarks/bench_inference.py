"""Dense vs sparse inference (hf_elsa.to_sparse_inference), decode tokens/s, prefill and weight memory.

    python benchmarks/bench_inference.py DIR [DIR ...]          # sparse folders (hf_elsa or plain HF)
    python benchmarks/bench_inference.py --smollm2 0.5 0.7 0.9 2:4 --out docs/deployment

``--smollm2`` builds SmolLM2-135M sparse folders by one-shot magnitude pruning (the speed depends on
where the zeros are only through how many there are per row, not on how they were chosen), benchmarks
each and writes ``results.json``, ``results.md`` and ``speedup.png`` to ``--out``. Each model's dense and
sparse runs are interleaved in one process (medians of ``--repeats``), one thread by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch


def make_smollm2_folder(spec: str, folder: str) -> str:
    """SmolLM2-135M pruned by magnitude to ``spec`` ("0.9" unstructured per tensor, or "2:4"), saved with masks."""
    from hf_elsa.demo import load_smollm2
    from hf_elsa.oneshot import magnitude
    from hf_elsa.sparse_io import attach_sparsity

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
    from hf_elsa.inference.bench import bench_inference, save_results

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
            row.append(f"{d:.1f} / {s:.1f} ({s / d:.2f}x)")
        row.append(f"{r.prefill_s['dense']:.3f} / {r.prefill_s['sparse']:.3f}")
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
    unstructured = sorted((r for r in results if "2:4" not in r.name and r.sparsity is not None),
                          key=lambda r: r.sparsity)
    for b, marker in zip(batches, "os^v"):
        ax.plot([100 * r.sparsity for r in unstructured], [r.speedup(b) for r in unstructured], marker=marker,
                label=f"decode, batch {b} (unstructured)")
        for r in results:
            if "2:4" in r.name:
                ax.scatter([100 * r.sparsity], [r.speedup(b)], marker="x", s=60, color="k")
                ax.annotate(f"2:4 b={b}", (100 * r.sparsity, r.speedup(b)), fontsize=7)
    ax.plot([100 * r.sparsity for r in unstructured],
            [r.prefill_s["dense"] / r.prefill_s["sparse"] for r in unstructured], "--", color="gray",
            label="prefill")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("sparsity of the pruned Linears (%)")
    ax.set_ylabel("speed-up over dense (end to end)")
    ax.set_title(f"SmolLM2-135M, CPU, {results[0].threads if results else 1} thread, fp32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return run(args.paths, args.smollm2, args.out, batch_sizes=tuple(args.batch_sizes), new_tokens=args.new_tokens,
               prompt_tokens=args.prompt_tokens, prefill_tokens=args.prefill_tokens, repeats=args.repeats,
               threads=args.threads)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if main() else 1)
