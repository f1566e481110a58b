"""benchmarks/gpu_session.sh: its dry run end to end on CPU, the step runner, and the carried assets.

The dry run is what keeps the GPU script from rotting between GPU windows: the same steps and code paths
with a tiny model, the CUDA-only pieces recorded as skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_assets
import gpu_session

STEP_KEYS = {"name", "status", "reason", "allotted_s", "seconds", "result"}


def _run_script(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--output_dir", str(tmp_path / "out"), *args], check=False, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    record = json.loads((tmp_path / "out" / gpu_session.JSON_NAME).read_text())
    markdown = (tmp_path / "out" / gpu_session.MARKDOWN_NAME).read_text()
    return done, record, markdown


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return _run_script(tmp_path_factory.mktemp("dry_run"), "--dry-run", "--minutes", "2")


def test_dry_run_runs_every_step_on_cpu_and_writes_the_documented_format(dry_run):
    done, record, markdown = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert record["schema"] == gpu_session.SCHEMA and record["mode"] == "dry-run"
    assert record["finished"] and 0 < record["elapsed_s"] <= record["budget_s"] == 120
    assert record["command"].startswith("bash benchmarks/gpu_session.sh") and "--dry-run" in record["command"]
    env = record["environment"]
    assert set(env["packages"]) == set(gpu_session.PACKAGES) and env["packages"]["torch"]
    assert env["hf_elsa"] == str(ROOT / "src" / "hf_elsa" / "__init__.py")  # this checkout's code, installed or not
    assert record["model"]["real_weights"] is False and "dry run" in record["model"]["name"]

    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == [s.name for s in gpu_session.STEPS]
    for step in record["steps"]:
        assert set(step) >= STEP_KEYS and step["status"] in ("ok", "failed", "skipped"), step
        assert (step["reason"] is None) == (step["status"] == "ok"), step
    skipped = {n for n, s in steps.items() if s["status"] == "skipped"}
    assert skipped == {"gpu_check_fsdp2"} and "no CUDA" in steps["gpu_check_fsdp2"]["reason"]
    assert all(s["status"] == "ok" for n, s in steps.items() if n not in skipped), markdown

    for name in ("gpu_check", "gpu_check_elsa_l"):
        checks = steps[name]["result"]["checks"]
        assert len(checks) >= 5 and all(c.startswith("PASS") for c in checks)
    assert "--elsa_l --cpu" in steps["gpu_check_elsa_l"]["result"]["command"]
    dense = steps["smollm2_dense"]["result"]
    assert math.isfinite(dense["perplexity"]) and dense["train_steps"] >= gpu_session.DRY_PLAN.min_steps
    for name in ("elsa_default", "elsa_paper", "masked_ft"):
        run = steps[name]["result"]
        assert run["steps_done"] == dense["train_steps"] and math.isfinite(run["perplexity"])
        assert run["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert run["predicted_memory_bytes"] > 0 and run["step_s"] > 0 and run["peak_memory_bytes"] is None
    assert steps["elsa_paper"]["result"]["recipe"] == "paper"
    assert steps["elsa_l_memory"]["result"]["optim"] == "adamw_bnb_8bit"
    elsa_l = steps["elsa_l_memory"]["result"]
    assert elsa_l["admm_phase_state_bytes"]["admm"] == elsa_l["predicted"]["admm"]  # z FP8 + u bf16 + statistics
    decode = steps["decode_speed"]["result"]
    assert decode["dense_tokens_per_s"]["1"] > 0 and decode["semi_structured"]["status"] == "skipped"

    assert "DRY RUN" in markdown and "Not the real model" in markdown
    for name in steps:
        assert f"| {name} |" in markdown
    assert "| ELSA, paper recipe |" in markdown and "| batch | dense tokens/s |" in markdown


def test_the_summary_renders_what_only_a_gpu_measures(dry_run):
    """The GPU-only fields (peak memory, the 2:4 decode, the device) in the summary, as a GPU run fills them."""
    record = json.loads(json.dumps(dry_run[1]))
    record.update(mode="gpu", finished=None)
    record["environment"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "count": 1,
                                    "memory_gib": 79.1}  # fmt: skip
    record["model"] = {"name": "SmolLM2-135M-Instruct (carried GGUF parts, dequantized)", "real_weights": True,
                       "text": "Wikipedia sample (carried token ids)"}  # fmt: skip
    steps = {s["name"]: s for s in record["steps"]}
    for name in ("elsa_default", "elsa_paper", "masked_ft", "elsa_l_memory", "hutchinson"):
        steps[name]["result"].update(peak_memory_bytes=3 * 2**30, peak_over_predicted=1.6)
    steps["decode_speed"]["result"]["semi_structured"] = {
        "status": "ok", "tensor": "SparseSemiStructuredTensorCUSPARSELT", "tokens_per_s": {"1": 90.5},
        "speedup": {"1": 0.8}, "logits_max_rel_diff": 0.01}  # fmt: skip
    steps["elsa_paper"].update(status="failed", reason="StepFailed: out of time: stopped at step 7 of 12")
    markdown = gpu_session.render_markdown(record)
    assert "(GPU)" in markdown and "NVIDIA H100 80GB HBM3 (79.1 GiB)" in markdown and "unfinished" in markdown
    assert "Not the real model" not in markdown and "3.00 GiB" in markdown
    assert "| 1 | " in markdown and "| 90.5 | 0.8 |" in markdown and "CUSPARSELT" in markdown
    assert "| elsa_paper | failed: StepFailed: out of time" in markdown


def test_a_summary_that_fails_to_render_does_not_lose_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "render_markdown", lambda record: 1 / 0)
    gpu_session.write_outputs({"steps": []}, tmp_path)
    assert json.loads((tmp_path / gpu_session.JSON_NAME).read_text()) == {"steps": []}
    assert "ZeroDivisionError" in (tmp_path / gpu_session.MARKDOWN_NAME).read_text()


def test_a_budget_too_small_for_any_step_skips_them_all_cleanly(tmp_path):
    done, record, _ = _run_script(tmp_path, "--dry-run", "--minutes", "0.02", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert record["finished"] and len(record["steps"]) == len(gpu_session.STEPS)
    assert all(s["status"] == "skipped" and s["reason"] for s in record["steps"])
    assert any(s["reason"].startswith("time:") for s in record["steps"])
    assert record["elapsed_s"] < 30


def test_only_runs_the_named_steps_and_rejects_unknown_ones(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "nope", "--output_dir", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "unknown step" in done.stderr


# ---------------------------------------------------------------------------------------------------
# the runner, with stand-in steps
# ---------------------------------------------------------------------------------------------------
def _session(steps, seconds: float, grace: float = 0.2):
    writes = []
    record = {"steps": []}
    session = gpu_session.Session(steps, time.monotonic() + seconds, record,
                                  lambda r: writes.append(json.loads(json.dumps(r))), grace=grace)  # fmt: skip
    return session, record, writes


def _boom(ctx, seconds, result):
    result["before"] = 1
    raise RuntimeError("boom")


def _fine(ctx, seconds, result):
    result["value"] = 42


def _hang(ctx, seconds, result):
    result["started"] = True
    time.sleep(60)


def test_a_step_that_raises_fails_alone_and_the_json_is_rewritten_after_every_step():
    steps = [gpu_session.Step("boom", _boom, 1), gpu_session.Step("fine", _fine, 1),
             gpu_session.Step("never", _fine, 1, requires=lambda ctx: "missing package(s): x")]  # fmt: skip
    session, record, writes = _session(steps, 10)
    session.run(ctx=None)
    boom, fine, never = record["steps"]
    assert boom["status"] == "failed" and boom["reason"] == "RuntimeError: boom" and "Traceback" in boom["traceback"]
    assert boom["result"] == {"before": 1}  # what a failing step measured before it failed is kept
    assert fine["status"] == "ok" and fine["result"] == {"value": 42} and fine["reason"] is None
    assert never["status"] == "skipped" and never["reason"] == "missing package(s): x"
    assert [len(w["steps"]) for w in writes] == [1, 2, 3]


def test_a_step_past_its_allotment_is_stopped_and_the_budget_holds():
    steps = [gpu_session.Step("hang", _hang, 1), gpu_session.Step("fine", _fine, 1),
             gpu_session.Step("late", _fine, 1, min_seconds=5)]  # fmt: skip
    session, record, _ = _session(steps, 3.0, grace=0.3)
    start = time.monotonic()
    session.run(ctx=None)
    assert time.monotonic() - start < 3.0
    hang, fine, late = record["steps"]
    assert hang["status"] == "failed" and "was stopped" in hang["reason"] and hang["result"] == {"started": True}
    assert hang["seconds"] == pytest.approx(hang["allotted_s"] + 0.3, abs=0.3)
    assert fine["status"] == "ok"
    assert late["status"] == "skipped" and late["reason"].startswith("time:")


def test_allotments_share_the_time_left_by_weight():
    steps = [gpu_session.Step("a", _fine, 1), gpu_session.Step("b", _fine, 3)]
    session, record, _ = _session(steps, 40.0, grace=0.0)
    assert session.planned_seconds("b") == pytest.approx(30.0, abs=0.5)
    session.run(ctx=None)
    a, b = record["steps"]
    assert a["allotted_s"] == pytest.approx(10.0, abs=0.5) and b["allotted_s"] == pytest.approx(40.0, abs=0.5)


def test_subprocess_steps_are_killed_with_their_children_at_their_allotment():
    start = time.monotonic()
    with pytest.raises(gpu_session.StepTimeout):
        gpu_session.run_command(["bash", "-c", "sleep 30 & sleep 30"], seconds=0.5)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------
# carried assets (gpu_assets.py)
# ---------------------------------------------------------------------------------------------------
def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_only_the_wheels_of_missing_packages_are_unpacked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels / "hf_elsa_absent_pkg-1.0-py3-none-any.whl", {"hf_elsa_absent_pkg/__init__.py": b"X = 1\n"})
    _wheel(wheels / "json-9.9-py3-none-any.whl", {"json/__init__.py": b"raise ImportError\n"})
    site = tmp_path / "site"
    assert gpu_assets.install_missing_wheels(wheels, site) == ["hf_elsa_absent_pkg"]
    assert (site / "hf_elsa_absent_pkg" / "__init__.py").is_file() and not (site / "json").exists()


def test_slimming_a_wheel_drops_the_files_and_their_record_lines(tmp_path):
    record = "pkg/__init__.py,sha256=a,1\npkg/libx_cuda118.so,sha256=b,2\npkg/libx_cuda130.so,sha256=c,3\n"
    wheel = _wheel(tmp_path / "pkg-1-py3-none-any.whl", {
        "pkg/__init__.py": b"", "pkg/libx_cuda118.so": b"old", "pkg/libx_cuda130.so": b"new",
        "pkg-1.dist-info/RECORD": record.encode()})  # fmt: skip
    gpu_assets._slim_wheel(wheel, lambda name: not name.endswith("cuda118.so"))
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == ["pkg-1.dist-info/RECORD", "pkg/__init__.py", "pkg/libx_cuda130.so"]
        assert "cuda118" not in archive.read("pkg-1.dist-info/RECORD").decode()


def test_bitsandbytes_keeps_its_cuda_13_and_cpu_libraries():
    keep = gpu_assets.BNB_KEEP
    assert keep.search("bitsandbytes/libbitsandbytes_cuda130.so") and keep.search("x/libbitsandbytes_cpu.so")
    assert not keep.search("bitsandbytes/libbitsandbytes_cuda128.so") and not keep.search("x/libbitsandbytes_rocm72.so")


def test_the_gguf_parts_of_two_calls_are_joined_and_checked(tmp_path):
    data = os.urandom(3000)
    parts = [{"name": "m.gguf.part0", "in": gpu_assets.STAGE}, {"name": "m.gguf.part1", "in": gpu_assets.ASSETS}]
    for part, chunk in zip(parts, (data[:1000], data[1000:]), strict=True):
        (tmp_path / part["in"]).mkdir(exist_ok=True)
        (tmp_path / part["in"] / part["name"]).write_bytes(chunk)
    manifest = {"gguf": {"file": "m.gguf", "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}}
    joined = gpu_assets.assemble_gguf(tmp_path, manifest, tmp_path / "out")
    assert joined.read_bytes() == data

    (tmp_path / gpu_assets.STAGE / "m.gguf.part0").unlink()
    joined.unlink()
    with pytest.raises(FileNotFoundError, match="part0"):
        gpu_assets.assemble_gguf(tmp_path, manifest, tmp_path / "out")
    (tmp_path / gpu_assets.STAGE / "m.gguf.part0").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="sha256"):
        gpu_assets.assemble_gguf(tmp_path, manifest, tmp_path / "out")


@pytest.mark.slow
def test_the_random_weight_fallback_has_smollm2s_shape():
    from hf_elsa.showcase.demo import load_smollm2

    config = load_smollm2()[0].config
    for key, value in gpu_session.SMOLLM2_SHAPE.items():
        actual = config.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(config, key)
        assert actual == pytest.approx(value, rel=1e-6), key
