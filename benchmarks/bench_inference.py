"""Dense vs sparse inference (hf_elsa.to_sparse_inference), decode tokens/s, prefill and weight memory.

    python benchmarks/bench_inference.py DIR [DIR ...]          # sparse folders (hf_elsa or plain HF)
    python benchmarks/bench_inference.py --smollm2 0.5 0.7 0.9 2:4 --out docs/deployment

``--smollm2`` builds SmolLM2-135M sparse folders by one-shot magnitude pruning (the speed depends on
where the zeros are only through how many there are per row, not on how they were chosen), benchmarks
each and writes ``results.json``, ``results.md`` and ``speedup.png`` to ``--out``. Each model's dense and
sparse runs are interleaved in one process (medians of ``--repeats``), one thread by default.
"""

from __future__ import annotations

import sys

import torch

from hf_elsa.inference.bench import main, run  # noqa: F401  (the logic lives in the package, for the CLI too)

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if main() else 1)
