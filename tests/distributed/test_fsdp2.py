"""ElsaOptimizer on FSDP2 (``fully_shard``, DTensor parameters), 2 gloo processes on CPU, against one unsharded process.

The Trainer cannot run FSDP on CPU, so this drives the optimizer wrapper directly (``fsdp2_worker.py``); the
Trainer + FSDP2 path on GPUs is checked by ``tests/distributed/gpu_check.py`` (docs/scaling.md).

Tolerances: the sharded run averages two half-batch gradients (reduce-scatter) where the reference takes one
full-batch mean, so weights differ by float rounding only (measured <= 3e-8); we allow 1e-6 absolute. Masks
(exact count, ties by lowest index, the whole tensor's threshold) must be identical, and a resumed run must
equal the uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import fsdp2_worker as worker

from hf_elsa.projection import pattern_sparsity

pytestmark = pytest.mark.distributed

ATOL = 1e-6


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", worker.__file__, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)] for name in worker.CONFIGS
    }


@functools.cache
def _reference(name):
    model = worker.build_model()
    opt, hooks = worker.make_optimizer(model, worker.CONFIGS[name])
    history = worker.train(model, opt, hooks, range(worker.STEPS))
    return {"history": history, **worker.snapshot(opt)}


@pytest.mark.filterwarnings("ignore:sparsity allocation.*cannot hold exactly:UserWarning")  # tight bounds, on purpose
@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_sharded_matches_unsharded(sharded_results, name):
    ranks = sharded_results[name]
    ref = _reference(name)
    settings = worker.CONFIGS[name]
    for rec in ranks:
        assert rec["world_size"] == 2 and rec["param_is_dtensor"]
        assert rec["local_rows"] < ref["weights"]["model.layers.0.self_attn.q_proj"].shape[0]  # really sharded
        # the fixed mask lives in the optimizer state as a bool DTensor sharded like its weight
        assert all(all(flags) for flags in rec["mask_layout"]), rec["mask_layout"]
    assert set(ranks[0]["masks"]) == set(ref["masks"]) == set(ref["weights"])
    target = pattern_sparsity(settings.sparsity_type, settings.sparsity)
    for n, w_ref in ref["weights"].items():
        w = ranks[0]["weights"][n]
        assert torch.equal(ranks[0]["masks"][n], ref["masks"][n]), f"{name}: mask of {n} differs from the unsharded run"
        assert torch.allclose(w, w_ref, rtol=0, atol=ATOL), f"{name}: {n} max diff {(w - w_ref).abs().max():.2e}"
        # exactly sparse: every pruned entry is 0, the count is exact
        assert torch.all(w[~ranks[0]["masks"][n]] == 0)
        if settings.sparsity_allocation == "uniform":
            assert int((~ranks[0]["masks"][n]).sum()) == round(w.numel() * target)
    if settings.sparsity_allocation != "uniform":  # one budget over all tensors, exact in total
        zeros = sum(int((~m).sum()) for m in ranks[0]["masks"].values())
        assert zeros == round(sum(w.numel() for w in ref["weights"].values()) * target)


@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_metrics_identical_on_every_rank(sharded_results, name):
    ranks = sharded_results[name]
    ref = _reference(name)
    assert ranks[0]["history"] == ranks[1]["history"]  # all-reduced sums: the same floats on both processes
    for mine, theirs in zip(ranks[0]["history"], ref["history"]):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert math.isclose(mine[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, mine[key], value)
    assert "elsa/primal_residual" in ranks[0]["history"][0]


@pytest.mark.parametrize("name", list(worker.CONFIGS))
@pytest.mark.parametrize("k", worker.RESUME_AT)
def test_sharded_checkpoint_resume_is_exact(sharded_results, name, k):
    for rec in sharded_results[name]:
        resumed = rec[f"resumed_{k}"]
        # z, u (ADMM phase) or the mask (after it) were saved as DTensors sharded like their weights
        assert resumed["state_layout"] and all(all(flags) for flags in resumed["state_layout"])
        for n, w in rec["weights"].items():
            assert torch.equal(resumed["weights"][n], w), f"{name}: resume at step {k}: {n} differs"
            assert torch.equal(resumed["masks"][n], rec["masks"][n])
