"""Wall time of the default recipe's warm start (SparseGPT) on 1 and on N processes, and whether they agree.

    torchrun --standalone --nproc_per_node 1 benchmarks/warm_start.py --blocks 64 --block_size 256
    torchrun --standalone --nproc_per_node 2 benchmarks/warm_start.py --blocks 64 --block_size 256

Each process runs its share of the calibration blocks through SmolLM2-135M (the embedded model, gensim's
Wikipedia text) one decoder layer at a time; the Hessians are summed over the processes before each layer is
pruned. Prints one line: processes, seconds, and a checksum of the masks and weights (equal checksums on 1 and N
processes: the same result). Run with ``OMP_NUM_THREADS=1`` so that N processes use N cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch.distributed as dist

from hf_elsa.data import token_blocks
from hf_elsa.oneshot import sparsegpt
from hf_elsa.showcase.demo import load_smollm2, wikipedia_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=64, help="calibration blocks (the recipe's admm_init_samples)")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    model, tokenizer = load_smollm2()
    train_docs, _ = wikipedia_split()
    calibration = token_blocks(train_docs, tokenizer, block_size=args.block_size, num_blocks=args.blocks)
    if dist.is_initialized():
        dist.barrier()
    started = time.perf_counter()
    masks = sparsegpt(model, calibration, sparsity=args.sparsity, progress=False)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(masks[name].numpy().tobytes())
        digest.update(model.get_submodule(name).weight.detach().numpy().tobytes())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warm start (sparsegpt, {args.blocks} x {args.block_size} tokens, sparsity {args.sparsity}): "
              f"{world} process(es) {seconds:.1f} s, masks+weights sha256 {digest.hexdigest()[:16]}")  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
