"""The example users copy (examples/prune.py) under ``torchrun`` on 2 gloo processes, on a model folder and a text file.

The equality of 2 processes and 1 is ``test_matrix.py``; this checks that the script itself runs as documented: one
summary line, one saved folder that loads back exactly sparse.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_model

from hf_elsa import load_sparse_model, sparsity_report

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def test_example_script_under_torchrun(tmp_path):
    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    words = ["the", "of", "and", "river", "stone", "market", "signal", "garden"]
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200)))
    out = tmp_path / "out"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "prune.py"),
           "--model_name_or_path", str(folder), "--text_files", str(text), "--output_dir", str(out),
           "--block_size", "32", "--max_steps", "4", "--sparsity", "0.6", "--per_device_train_batch_size", "2",
           "--admm_init_samples", "8", "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none",
           "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = [line for line in proc.stdout.splitlines() if "pruned model saved to" in line]
    assert len(summary) == 1 and "(2 process(es))" in summary[0], proc.stdout[-2000:]
    report = sparsity_report(out)
    assert report.tensors and all(abs(t.sparsity - 0.6) < 1e-3 for t in report.tensors)
    model = load_sparse_model(out)
    assert sparsity_report(model).sparsity == pytest.approx(report.sparsity)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
