"""Loads during and after saves, and hostile folders (issue 22): a load gets the old or the new checkpoint while
another save swaps one in, never deletes anything, and every malformed folder is a clear ValueError."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import finish_interrupted_save
from hf_elsa.sparse_io import load as load_module
from hf_elsa.sparse_io.commit import NEW_PREFIX, OLD_PREFIX, TMP_PREFIX

from .helpers import assert_bit_identical, pruned_model, state


def _listing(parent: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(parent)): sorted(os.listdir(p)) for p in [parent, *parent.rglob("*")] if p.is_dir()}


# -- a save swapped in while a load runs -------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["verify_files", "read_masks"])
def test_a_load_during_a_swap_gets_the_new_model_not_a_corruption_error(step, monkeypatch, tmp_path):
    """Another process swaps a new save in after the load read elsa_config.json (step 'verify_files': the hashes
    then describe the old files) or after it verified the files (step 'read_masks'): the load starts over."""
    folder = tmp_path / "m"
    old, new = pruned_model(seed=1), pruned_model(seed=2)
    old.save_pretrained(folder)
    real = getattr(load_module, step)
    calls = []

    def swap_then(*args, **kwargs):
        if not calls:
            new.save_pretrained(folder)  # the other process's save lands now
        calls.append(step)
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module, step, swap_then)
    loaded = load_sparse_model(folder)
    assert len(calls) == 2  # started over once
    assert_bit_identical(state(new), loaded, canonical_zero=True)


def test_a_folder_that_keeps_changing_is_an_error_not_a_loop(monkeypatch, tmp_path):
    folder = tmp_path / "m"
    models = [pruned_model(seed=s) for s in (1, 2)]
    models[0].save_pretrained(folder)
    real = load_module.verify_files
    count = []

    def swap_every_time(*args, **kwargs):
        count.append(1)
        models[len(count) % 2].save_pretrained(folder)
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module, "verify_files", swap_every_time)
    monkeypatch.setattr(load_module, "RETRY_PAUSE_S", 0.0)
    with pytest.raises(ValueError, match="changed .* while it was being read"):
        load_sparse_model(folder)
    assert len(count) == load_module.ATTEMPTS


# -- a read never deletes ----------------------------------------------------------------------------------------


def test_a_load_leaves_a_killed_save_and_a_restored_folder_alone(tmp_path):
    """A complete new folder of a killed save next to a folder the user restored by hand: the load reads the
    folder as it is and deletes nothing; finish_interrupted_save (or the next save) rolls the new one forward."""
    folder = tmp_path / "m"
    old, new = pruned_model(seed=1), pruned_model(seed=2)
    old.save_pretrained(folder)  # the model the user restored, saved before the killed save started
    new.save_pretrained(tmp_path / "staging")
    save_id = json.loads((tmp_path / "staging" / "config.json").read_text())["elsa_sparsity"]["save_id"]
    leftover = tmp_path / f"{NEW_PREFIX}m-{save_id}"
    os.rename(tmp_path / "staging", leftover)
    before = _listing(tmp_path)
    assert_bit_identical(state(old), load_sparse_model(folder))
    assert _listing(tmp_path) == before  # nothing deleted, nothing moved
    finish_interrupted_save(folder)  # the explicit, writing step
    assert_bit_identical(state(new), load_sparse_model(folder), canonical_zero=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_missing_folder_with_a_killed_save_next_to_it_says_how_to_finish(tmp_path):
    """Killed between the two renames (no RENAME_EXCHANGE): the folder is an .hf_elsa_old- sibling for now."""
    folder = tmp_path / "m"
    pruned_model(seed=1).save_pretrained(folder)
    os.rename(folder, tmp_path / f"{OLD_PREFIX}m-{'0' * 32}")
    before = _listing(tmp_path)
    with pytest.raises(FileNotFoundError, match="finish_interrupted_save"):
        load_sparse_model(folder)
    assert _listing(tmp_path) == before
    finish_interrupted_save(folder)
    load_sparse_model(folder)


KILLED_BY_SIGTERM = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from sparse_io.helpers import pruned_model
    from hf_elsa.sparse_io import save

    real = save.write_masks
    def slow_write_masks(path, *args):
        real(path, *args)
        Path({flag!r}).touch()
        time.sleep(60)
    save.write_masks = slow_write_masks
    pruned_model(seed=2).save_pretrained({target!r})
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s
def test_a_save_stopped_by_sigterm_removes_its_temporary_copy(tmp_path):
    """``kill PID`` (SIGTERM, what schedulers and timeouts send) ends the save like Ctrl-C: the .hf_elsa_tmp- copy is
    removed at once, not left until the next save."""
    target, flag = tmp_path / "m", tmp_path / "writing"
    pruned_model(seed=1).save_pretrained(target)
    script = KILLED_BY_SIGTERM.format(tests=str(Path(__file__).parents[1]), flag=str(flag), target=str(target))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the save never reached the masks"
        assert list(tmp_path.glob(f"{TMP_PREFIX}*"))
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "writing"]


# -- hostile folders ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "m"
    pruned_model(seed=1).save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    return folder


@pytest.mark.parametrize("name", ["config.json", "elsa_config.json"])
def test_a_json_nesting_bomb_is_a_clear_error(name, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"{name}.*nest"):
        load_sparse_model(folder, verify=False)


def test_a_symlink_loop_is_the_documented_value_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    os.symlink("loop-b", folder / "model.safetensors")
    os.symlink("model.safetensors", folder / "loop-b")
    with pytest.raises(ValueError, match=r"model\.safetensors.*symlink loop"):
        load_sparse_model(folder)


def test_hf_elsa_eval_reports_a_symlink_loop_in_one_line(saved, tmp_path, capsys):
    from hf_elsa.cli import main

    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    os.symlink("model.safetensors", folder / "model.safetensors")
    assert main(["inspect", str(folder)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "symlink loop" in err


def test_a_shard_index_pointing_outside_is_refused_by_hf_elsa(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*elsewhere\.safetensors.*outside"):
        load_sparse_model(folder, verify=False)


def test_a_malformed_shard_index_is_a_clear_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["not", "a", "mapping"]}))
    with pytest.raises(ValueError, match=r"index\.json.*weight_map"):
        load_sparse_model(folder, verify=False)


def test_loaded_weights_are_untouched_by_the_checks(saved):
    model = load_sparse_model(saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
