"""How small is a sparse checkpoint? SmolLM2-135M, every prunable weight magnitude-pruned, both formats.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_size.py [--sparsity 0.9] [--dtype float32|bfloat16] [--out DIR]

Prints one JSON line: bytes of the pruned tensors (compressed vs dense), of the whole folders (hf_elsa
dense, hf_elsa compressed, and a plain ``save_pretrained`` of the same model), of the masks (packed bits vs
as stored, zlib-coded), save/load times, and whether both formats load back bit-identical (pruned zeros
compared as +0.0 for the compressed format).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hf_elsa import load_sparse_model, sparsity_report
from hf_elsa.projection import project
from hf_elsa.showcase.demo import load_smollm2
from hf_elsa.sparse_io import MASKS_NAME, attach_sparsity, detach_sparsity, read_masks
from hf_elsa.targets import find_prunable_modules


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@torch.no_grad()
def prune(model, sparsity: float) -> dict[str, torch.Tensor]:
    masks = {}
    for name, module in find_prunable_modules(model).items():
        projected, mask = project(module.weight, sparsity)
        module.weight.copy_(projected)
        masks[name] = mask
    return masks


def same_bits(a: torch.Tensor, b: torch.Tensor, canonical_zero: bool) -> bool:
    if canonical_zero:
        a, b = torch.where(a == 0, 0, a), torch.where(b == 0, 0, b)
    view = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="keep the folders here (default: a temporary folder)")
    args = parser.parse_args(argv)

    model, _ = load_smollm2(getattr(torch, args.dtype))
    start = time.perf_counter()
    masks = prune(model, args.sparsity)
    prune_s = time.perf_counter() - start
    attach_sparsity(
        model,
        masks,
        {
            "method": "magnitude",
            "sparsity": args.sparsity,
            "sparsity_type": "unstructured",
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        },
    )
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        result = {
            "model": "SmolLM2-135M-Instruct",
            "dtype": args.dtype,
            "sparsity": args.sparsity,
            "prune_s": round(prune_s, 2),
        }
        for fmt in ("dense", "compressed"):
            folder = root / fmt
            start = time.perf_counter()
            model.save_pretrained(folder, compressed=fmt == "compressed")
            result[f"{fmt}_save_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            loaded = load_sparse_model(folder)
            result[f"{fmt}_load_s"] = round(time.perf_counter() - start, 2)
            state = loaded.state_dict()
            result[f"{fmt}_bit_identical"] = all(
                same_bits(v, state[k], canonical_zero=fmt == "compressed") for k, v in expected.items()
            )
            result[f"{fmt}_folder_bytes"] = folder_bytes(folder)
            del loaded, state
        report = sparsity_report(root / "compressed")
        pruned_stored = sum(t.stored_bytes for t in report.tensors)
        pruned_dense = sum(t.dense_bytes for t in report.tensors)
        masks = read_masks(root / "compressed" / MASKS_NAME)
        mask_packed = sum(m.bits.numel() for m in masks.values())
        mask_stored = sum(m.stored_nbytes for m in masks.values())
        detach_sparsity(model)
        model.save_pretrained(root / "plain")
        result["plain_folder_bytes"] = folder_bytes(root / "plain")

    result.update(
        achieved_sparsity=round(report.sparsity, 6),
        pruned_tensors_dense_bytes=pruned_dense,
        pruned_tensors_compressed_bytes=pruned_stored,
        pruned_tensors_ratio=round(pruned_stored / pruned_dense, 4),
        masks_packed_bytes=mask_packed,
        masks_stored_bytes=mask_stored,
        masks_ratio_vs_dense=round(mask_stored / pruned_dense, 4),
        folder_ratio_vs_dense=round(result["compressed_folder_bytes"] / result["dense_folder_bytes"], 4),
        folder_ratio_vs_plain=round(result["compressed_folder_bytes"] / result["plain_folder_bytes"], 4),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
