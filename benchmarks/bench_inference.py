"""Dense vs sparse inference: decode tokens/s, prefill and weight memory (usage: ``--help``, or
``hf_elsa.showcase.inference_bench.USAGE``; the same benchmark as ``hf-elsa bench-inference``)."""

from __future__ import annotations

import sys

import torch

from hf_elsa.showcase.inference_bench import main, run  # noqa: F401  (the logic lives in the package, for the CLI too)

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if main() else 1)
