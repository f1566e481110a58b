"""The default recipe through every combination users make, on 2 gloo processes against 1 (``trainer_worker.py``).

Each cell of ``trainer_worker.CASES`` runs ``ElsaTrainer`` itself at 80% (the default recipe there: SparseGPT starts
10 points denser and ADMM's ramp prunes the rest, distillation from the dense model) on the same global batch: DDP
under ``torchrun`` and under ``accelerate launch``, FSDP2 sharded by accelerate's own preparation, keep-mask
fine-tuning, LoRA (``peft_config=`` and a ``PeftModel``, with and without a teacher), resume inside the ADMM phase and
after the mask is fixed, ELSA-L, N:M, global and OWL allocation, gradient accumulation, gradient checkpointing and
bf16 autocast, and N:M reached by a ramp from a denser start.

What must hold, per cell: the model ends exactly sparse; both processes hold the same weights and masks bit for
bit; 2 processes equal 1 process (DDP's all-reduce and FSDP2's reduce-scatter average two halves where one process
sums one batch: float rounding only, measured 0 on these runs; we allow ``ATOL`` on weights, identical masks); a
resumed run equals the straight one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import trainer_worker as worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
DDP_CONFIG = ROOT / "examples" / "accelerate_configs" / "ddp.yaml"
ATOL = 1e-5
SINGLE = [name for name, case in worker.CASES.items() if not case.fsdp2]  # fsdp2 cells compare to these runs
ACCELERATE_CASES = ["default", "lora_config"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, check=False, env=env or _env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    script = str(Path(worker.__file__))
    _run([sys.executable, script, str(out / "one"), *SINGLE])
    _run(["torchrun", "--standalone", "--nproc_per_node", "2", script, str(out / "two"), *worker.CASES])
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}  # the config's MULTI_GPU over gloo on CPU: 2 real processes
    _run(["accelerate", "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
          "--main_process_port", str(_free_port()), script, str(out / "accelerate"), *ACCELERATE_CASES], env)  # fmt: skip

    def load(folder, name, ranks):
        return [torch.load(out / folder / f"{name}_rank{r}.pt", weights_only=False) for r in range(ranks)]

    return {
        "one": {name: load("one", name, 1)[0] for name in SINGLE},
        "two": {name: load("two", name, 2) for name in worker.CASES},
        "accelerate": {name: load("accelerate", name, 2) for name in ACCELERATE_CASES},
    }


def _reference(results, name):
    case = worker.CASES[name]
    return (
        results["one"][name.removeprefix("fsdp2_").replace("fsdp2", "default")] if case.fsdp2 else results["one"][name]
    )


def _assert_exactly_sparse(record, name):
    case = worker.CASES[name]
    pattern = case.overrides.get("sparsity_type", "unstructured")
    total = zeros = 0
    for tensor, w in record["weights"].items():
        mask = record["masks"].get(tensor)
        if mask is not None:
            assert torch.all(w[~mask] == 0), f"{name}: {tensor} is not zero where its mask prunes"
        n = int((w == 0).sum())
        total, zeros = total + w.numel(), zeros + n
        if pattern == "2:4":
            assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2), f"{name}: {tensor} breaks 2:4"
        elif case.overrides.get("sparsity_allocation", "uniform") == "uniform":
            assert n >= round(worker.SPARSITY * w.numel()), f"{name}: {tensor} has {n} zeros"
    if pattern != "2:4" and case.overrides.get("sparsity_allocation", "uniform") != "uniform":
        assert zeros >= round(worker.SPARSITY * total), f"{name}: {zeros} zeros of {total}"  # one global budget


@pytest.mark.parametrize(
    ("launcher", "name"), [("two", n) for n in worker.CASES] + [("accelerate", n) for n in ACCELERATE_CASES]
)
def test_two_processes_equal_one(results, launcher, name):
    ranks, ref = results[launcher][name], _reference(results, name)
    a, b = ranks
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks) and ref["world_size"] == 1
    assert a["param_is_dtensor"] == worker.CASES[name].fsdp2  # FSDP2 cells really sharded, DDP cells replicated
    for tensor in a["weights"]:
        assert torch.equal(a["weights"][tensor], b["weights"][tensor]), f"{name}: ranks differ on {tensor}"
    assert a["history"] == b["history"]
    assert set(a["masks"]) == set(ref["masks"])
    for tensor, w_ref in ref["weights"].items():
        if tensor in ref["masks"]:
            assert torch.equal(a["masks"][tensor], ref["masks"][tensor]), f"{name}: mask of {tensor} differs"
        diff = (a["weights"][tensor] - w_ref).abs().max().item()
        assert diff <= ATOL, f"{name}: max |W_2proc - W_1proc| of {tensor} = {diff:.2e}"
    losses = [h["loss"] for h in a["history"] if "loss" in h]
    ref_losses = [h["loss"] for h in ref["history"] if "loss" in h]
    assert len(losses) == len(ref_losses) == worker.STEPS
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6), (losses, ref_losses)
    assert a["teacher"] == ref["teacher"]
    _assert_exactly_sparse(a, name)


@pytest.mark.parametrize("name", SINGLE)
def test_every_cell_ends_exactly_sparse_on_one_process(results, name):
    _assert_exactly_sparse(results["one"][name], name)


@pytest.mark.parametrize("name", [n for n, c in worker.CASES.items() if c.resume_at])
def test_resume_equals_the_straight_run(results, name):
    records = results["two"][name] + ([results["one"][name]] if name in results["one"] else [])
    for record in records:
        resumed = record["resumed"]
        for tensor, w in record["weights"].items():
            assert torch.equal(resumed["weights"][tensor], w), (
                f"{name}: resumed {tensor} differs (world {record['world_size']})"
            )
        for tensor, mask in record["masks"].items():
            assert torch.equal(resumed["masks"][tensor], mask)


def test_the_teacher_rule(results):
    one = results["one"]
    # dense model: a copy of it teaches; an already sparse one (keep-mask, LoRA on a sparse base) does not, unless
    # a dense teacher_model is given
    assert one["default"]["teacher"] and one["resume_admm"]["resumed"]["teacher"]
    assert not one["keep_mask"]["teacher"] and not one["lora_config"]["teacher"]
    assert one["keep_mask_teacher"]["teacher"] and one["lora_model_teacher"]["teacher"]
    distilled = [h for h in one["lora_model_teacher"]["history"] if "loss_distill" in h]
    assert distilled and all(h["loss_distill"] > 0 for h in distilled)
    assert not any("loss_distill" in h for h in one["lora_config"]["history"])


@pytest.mark.parametrize(("launcher", "name"), [("one", "default"), ("two", "default"), ("two", "fsdp2")])
def test_the_mask_search_prunes_the_last_points(results, launcher, name):
    # the default recipe at 80%: SparseGPT starts at 70% and the ramp of z prunes the last 10% of the weights
    for record in results[launcher][name] if launcher == "two" else [results[launcher][name]]:
        assert record["admm_init_sparsity"] == pytest.approx(worker.SPARSITY - 0.1)
        assert record["mask_moved_from_start"] == pytest.approx(0.1, abs=0.01)


def test_warm_start_is_split_over_the_processes(results):
    # each process calibrates on half the blocks; the time is reported in the note (trainer.warm_start_seconds)
    assert results["one"]["default"]["warm_start_seconds"] > 0
    assert all(r["warm_start_seconds"] > 0 for r in results["two"]["default"])


@pytest.mark.parametrize(("launcher", "name"), [("one", "default"), ("two", "default"), ("two", "fsdp2")])
def test_held_memory_matches_estimate_memory(results, launcher, name):
    """What each process holds at the end (its shards under FSDP2, the teacher's too) against ``estimate_memory``.

    Weights and the teacher match to the byte; the optimizer's state adds Adam's per-parameter step counters; the
    ADMM state at the end (masks, statistics) stays under the estimate's ADMM-phase peak (z and u)."""
    records = results[launcher][name]
    for record in records if isinstance(records, list) else [records]:
        measured, estimate = record["memory"]["measured"], record["memory"]["estimate"]
        assert measured["weights"] == estimate["weights"] and measured["teacher"] == estimate["teacher"] > 0
        assert estimate["optimizer"] <= measured["optimizer"] <= 1.01 * estimate["optimizer"]
        assert 0 < measured["admm"] <= estimate["admm"]
    if name == "fsdp2":
        one = results["one"]["default"]["memory"]["measured"]
        assert measured["teacher"] == one["teacher"] // 2  # the teacher is sharded like the student
