"""One pruned Linear, dense vs each CPU sparse kernel, per weight dtype and token count, in one run.

    python benchmarks/kernel_layer.py [--shape 1536 576] [--sparsity 0.9] [--tokens 1 8] [--threads 1]

Times ``nn.Linear`` (PyTorch's dense matmul) against ``SparseLinear`` with every kernel that runs for the
dtype here (fp32 and bf16), interleaved, median of the repeats, and prints the speed-ups: a quick look at
where a kernel can win before ``to_sparse_inference`` measures a whole model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def run(shape=(1536, 576), sparsity=0.9, tokens=(1, 8), threads=1, repeats=7, calls=100) -> list[dict]:
    from hf_elsa.inference import SparseLinear, available_kernels

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        linear = nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            linear.weight[torch.rand(*shape, generator=gen) < sparsity] = 0
        linear = linear.to(dtype)
        kernels = [k for k, why in available_kernels(dtype).items() if not why and k != "densify"]
        layers = {k: SparseLinear.from_linear(linear, [(1, k)]) for k in kernels}
        for n in tokens:
            x = torch.randn(n, shape[1], generator=gen).to(dtype)
            fns = {"dense": lambda linear=linear, x=x: linear(x)}
            fns.update({k: (lambda layer=layer, x=x: layer(x)) for k, layer in layers.items()})
            times = {name: [] for name in fns}
            with torch.no_grad():
                for _ in range(repeats):
                    for name, fn in fns.items():
                        fn()
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[name].append((time.perf_counter() - start) / calls)
            dense = statistics.median(times["dense"])
            for name in kernels:
                kernel = statistics.median(times[name])
                rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": n, "kernel": name,
                             "dense_us": dense * 1e6, "kernel_us": kernel * 1e6, "speedup": dense / kernel})  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=2, type=int, default=[1536, 576], metavar=("OUT", "IN"))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    rows = run(tuple(args.shape), args.sparsity, tuple(args.tokens), args.threads)
    print(f"Linear {args.shape[0]}x{args.shape[1]} at sparsity {args.sparsity}, {args.threads} thread(s)")
    print("| dtype | tokens | kernel | dense us | kernel us | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['tokens']} | {r['kernel']} | {r['dense_us']:.0f} | {r['kernel_us']:.0f} | "
            f"{r['speedup']:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
