"""Smoke tests of the measurement scripts in benchmarks/ that have no test file of their own: each runs on tiny
inputs and passes its own checks (kept apart from the library's tests: these scripts are not the library)."""

import torch
from conftest import load_script


def test_kernel_layer_benchmark_runs():
    script = load_script("benchmarks/kernel_layer.py")
    rows = script.run(shape=(24, 16), tokens=(1, 3), repeats=1, calls=2)
    assert {(r["dtype"], r["tokens"]) for r in rows} == {(d, n) for d in ("float32", "bfloat16") for n in (1, 3)}
    assert all(r["speedup"] > 0 for r in rows)


def test_projection_speed_benchmark_runs_on_small_tensors():
    """benchmarks/projection_speed.py: every case runs and old/new masks and allocations agree (its own checks)."""
    script = load_script("benchmarks/projection_speed.py")
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(shape, generator=gen) for shape in ((64, 48), (16, 9000), (128, 32))]
    result = script.run(sparsity=0.8, repeats=1, scores=scores)
    assert len(result) == 7 and all(seconds > 0 for seconds in result.values())


def test_distill_kl_benchmark_agrees_with_its_reference(capsys):
    """benchmarks/distill_kl.py: chunked_kl and the checkpointed plain KL give the same loss and gradient."""
    import re

    load_script("benchmarks/distill_kl.py").main(
        ["--tokens", "16", "--sequence", "8", "--vocab", "50", "--repeats", "1"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["T=1", "T=2"]
    for line in lines:
        loss_diff, grad_diff = map(float, re.search(r"loss rel. diff (\S+), grad max diff (\S+);", line).groups())
        assert loss_diff < 1e-5 and grad_diff < 1e-6, line
