"""CPU runs: keep the memory a training step frees inside the process (glibc's allocator, Linux).

A training step on the CPU allocates and frees the same large tensors every step (logits of ``tokens x vocab``,
activations, gradients). glibc serves each block above 32 MB with a fresh ``mmap`` and returns it on free, so every
step touches all of that memory anew through page faults: on SmolLM2 at 4 x 128 tokens ~20% of the CPU time went to
the kernel. With ``mmap`` for large blocks off and trimming only beyond 2 GB of free heap, freed blocks are reused:
``benchmarks/overhead.py --allocator`` measures the step time and peak memory with and without.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# the user's own choice, in glibc's environment variables, wins
_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for repeated large CPU allocations; ``True`` when applied.

    A no-op (``False``) off Linux, without glibc's ``mallopt``, or when the environment already sets the allocator
    (``MALLOC_*_`` variables, or another allocator through ``LD_PRELOAD``).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
