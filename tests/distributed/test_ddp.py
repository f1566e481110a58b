"""The real example script (examples/prune.py) on 2 processes (DDP over gloo, CPU) against 1 process.

Launch commands (the ones docs/scaling.md gives):

    torchrun --standalone --nproc_per_node 2 examples/prune.py --tiny ... --per_device_train_batch_size 2
    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/ddp.yaml \
        --num_processes 2 --main_process_port PORT examples/prune.py --tiny ... --per_device_train_batch_size 2

against ``python examples/prune.py --tiny ... --per_device_train_batch_size 4`` (same global batch of 4, the
same samples in the same order). What must hold:

- the ADMM state (z, u, lambda, step), weights, masks and logged diagnostics are identical on both ranks
  (bit for bit: every rank projects the same all-reduced weights);
- the 2-process run matches the 1-process run: the DDP all-reduce averages two half-batch gradients where
  one process takes the full-batch mean, so they differ by float rounding only (measured <= 1e-8); we allow
  1e-6 absolute on weights, z and u, and require identical masks. A penalty divided by the number of processes
  (the released code's defect) changes the masks (default recipe) and moves
  the weights by ~2e-3 (paper recipe) within these 6 steps: measured, both variants fail.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "prune.py"
DDP_CONFIG = ROOT / "examples" / "accelerate_configs" / "ddp.yaml"
# 2 processes vs 1 differ only in float32 summation order (DDP's all-reduce). With distillation (the default
# recipe) the first steps' gradients are a KL of nearly equal distributions, and Adam's normalisation turns their
# rounding into updates of ~1e-6: measured up to 2.2e-6 on these weights (~0.05). Masks must still be identical.
ATOL = 1e-5
SPARSITY = 0.7
RECIPES = {
    # default recipe: proximal pull, cubic ramp, activation-aware score (statistics all-reduced)
    "elsa": ["--recipe", "elsa"],
    # paper recipe: the penalty goes through the gradient, after DDP's all-reduce
    "paper": ["--recipe", "paper"],
    # distillation with every term on: KL at T = 2 and the hidden-state loss, one frozen teacher per process
    "distill": ["--recipe", "elsa", "--distill_weight", "0.5", "--distill_temperature", "2.0"]
    + ["--distill_hidden_weight", "0.1"],
}


def _options(text: Path, out: Path, recipe: str, batch: int) -> list[str]:
    return [
        "--tiny", "--text_files", str(text), "--block_size", "32", "--num_blocks", "64", "--eval_fraction", "0",
        "--max_steps", "6", "--admm_fraction", "0.5", "--admm_interval", "1", "--sparsity", str(SPARSITY),
        "--learning_rate", "1e-3", "--per_device_train_batch_size", str(batch), "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--seed", "0", "--data_seed", "0", "--dataloader_num_workers", "0",
        "--output_dir", str(out / "model"), "--dump_state", str(out / "dump"), *RECIPES[recipe],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "river", "stone", "market", "signal"]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, options: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if launcher == "torchrun":
        cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT), *options]
    else:
        env["ACCELERATE_USE_CPU"] = "1"  # the config's MULTI_GPU over gloo on CPU: 2 real processes
        cmd = ["accelerate", "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(SCRIPT), *options]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def _run_one_process(options: list[str]) -> None:
    """``python examples/prune.py ...``, in this process (the script's ``main``; saves the start-up time)."""
    module = sys.modules.get("elsa_prune_example")
    if module is None:
        spec = importlib.util.spec_from_file_location("elsa_prune_example", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through sys.modules
        spec.loader.exec_module(module)
    module.main(options)


def _load(folder: Path) -> list[dict]:
    return [torch.load(path, weights_only=False) for path in sorted(folder.glob("rank*.pt"))]


@pytest.mark.parametrize(
    ("launcher", "recipe"), [("torchrun", "elsa"), ("accelerate", "paper"), ("torchrun", "distill")]
)
def test_two_processes_match_one(launcher, recipe, text_file, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_one_process(_options(text_file, tmp_path / "one", recipe, batch=4))
    _launch(launcher, _options(text_file, tmp_path / "two", recipe, batch=2))
    (ref,) = _load(tmp_path / "one" / "dump")
    ranks = _load(tmp_path / "two" / "dump")

    # really two processes, each of which saw world size 2
    assert ref["world_size"] == 1
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    # identical on every rank, bit for bit
    a, b = ranks
    assert a["admm_state"], "no ADMM state recorded: the run never was in the ADMM phase"
    for name, state in a["admm_state"].items():
        for key, value in state.items():
            other = b["admm_state"][name][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (name, key)
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    logged = [{k: v for k, v in h.items() if k.startswith("elsa/") or k == "loss"} for h in a["log_history"]]
    assert logged == [{k: v for k, v in h.items() if k.startswith("elsa/") or k == "loss"} for h in b["log_history"]]

    # 2 processes x batch 2 == 1 process x batch 4
    assert set(a["weights"]) == set(ref["weights"]) == set(ref["masks"])
    for name, w_ref in ref["weights"].items():
        w, mask = a["weights"][name], a["masks"][name]
        assert torch.equal(mask, ref["masks"][name]), f"mask of {name} differs from the 1-process run"
        diff = (w - w_ref).abs().max().item()
        assert diff <= ATOL, f"{name}: max |W_2proc - W_1proc| = {diff:.2e} > {ATOL}"
        assert torch.all(w[~mask] == 0) and int((~mask).sum()) == round(w.numel() * SPARSITY)
    for name, state in ref["admm_state"].items():
        mine = a["admm_state"][name]
        assert mine["elsa_step"] == state["elsa_step"] and mine["elsa_lambda"] == state["elsa_lambda"]
        diff = (mine["elsa_z"] - state["elsa_z"]).abs().max().item()
        assert diff <= ATOL, f"{name}.elsa_z: {diff:.2e}"
        # u sums W - z over every z-update: where an intermediate z-update of the ramp met a near-tie, rounding can
        # send that entry the other way in one run, and its u then differs by that weight's size (2026-11-28, default
        # w = 0.75: one entry of 2,048 at 4.6e-5, final masks identical). Allow a few such entries, each small.
        diff = (mine["elsa_u"] - state["elsa_u"]).abs()
        flipped = int((diff > ATOL).sum())
        assert flipped <= max(1, diff.numel() // 1000), f"{name}.elsa_u: {flipped} entries differ by > {ATOL}"
        assert diff.max().item() <= 1e-3, f"{name}.elsa_u: {diff.max().item():.2e}"
    ref_losses = [h["loss"] for h in ref["log_history"] if "loss" in h]
    losses = [h["loss"] for h in a["log_history"] if "loss" in h]
    assert len(losses) == len(ref_losses) == 6
    # with distillation the loss is a KL of nearly equal distributions (~1e-4): an absolute tolerance too
    assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(losses, ref_losses)), (losses, ref_losses)
    for key in ("loss_ce", "loss_distill", "loss_hidden"):  # distillation's parts, averaged over the processes
        ref_parts = [h[key] for h in ref["log_history"] if key in h]
        parts = [h[key] for h in a["log_history"] if key in h]
        assert parts == [h[key] for h in b["log_history"] if key in h], key
        expected = 6 if recipe == "distill" or (recipe == "elsa" and key != "loss_hidden") else 0
        assert len(parts) == len(ref_parts) == expected, key
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(parts, ref_parts)), (key, parts, ref_parts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
