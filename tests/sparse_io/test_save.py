"""Atomic saves: failing, interrupted and killed saves (hf_elsa.sparse_io.save)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import COMPRESSED_NAME
from hf_elsa.sparse_io import save as save_module
from hf_elsa.sparse_io.formats import CompressedFormat
from hf_elsa.sparse_io.save import TMP_PREFIX

from .helpers import assert_bit_identical, pruned_model, state


def test_resave_switches_format_in_place_and_keeps_foreign_files(tmp_path):
    folder = tmp_path / "m"
    model = pruned_model()
    expected = state(model)
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "checkpoint-1").mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"stale weights of an older save")
    model.save_pretrained(folder)
    assert not (folder / "pytorch_model.bin").exists()
    model.save_pretrained(folder, compressed=True)
    assert not (folder / "model.safetensors").exists()  # stale dense weights would load silently
    assert (folder / "tokenizer.json").exists() and (folder / "checkpoint-1").is_dir()
    assert_bit_identical(expected, load_sparse_model(folder), canonical_zero=True)
    model.save_pretrained(folder)
    assert not (folder / COMPRESSED_NAME).exists()
    assert_bit_identical(expected, load_sparse_model(folder))


def _no_tmp_left(parent: Path) -> bool:
    return not list(parent.glob(f"{TMP_PREFIX}*"))


@pytest.mark.parametrize(
    "owner, failing",
    [(save_module, "write_masks"), (CompressedFormat, "write"), (save_module, "file_info")],
    ids=["write_masks", "compress", "file_info"],
)
def test_a_failing_save_leaves_the_old_folder_intact(owner, failing, monkeypatch, tmp_path):
    old = pruned_model(seed=1)
    old.save_pretrained(tmp_path / "m")
    expected = state(old)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(owner, failing, boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pruned_model(seed=2).save_pretrained(tmp_path / "m", compressed=True)
    assert_bit_identical(expected, load_sparse_model(tmp_path / "m"))
    assert _no_tmp_left(tmp_path)


def test_an_interrupted_commit_never_leaves_a_loadable_wrong_model(monkeypatch, tmp_path):
    pruned_model(seed=1).save_pretrained(tmp_path / "m")
    real_replace, moved = os.replace, []

    def replace_then_die(src, dst):
        if Path(dst).parent == tmp_path / "m" and len(moved) == 2:
            raise KeyboardInterrupt  # killed in the middle of moving files into place
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        pruned_model(seed=2).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(save_module.os, "replace", real_replace)
    with pytest.raises(ValueError, match="no config.json"):
        load_sparse_model(tmp_path / "m")
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers' own "no config" errors
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    new = pruned_model(seed=2)
    new.save_pretrained(tmp_path / "m")  # the next save repairs the folder
    assert_bit_identical(state(new), load_sparse_model(tmp_path / "m"))


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from sparse_io.helpers import pruned_model
    from hf_elsa.sparse_io import save

    real = save.write_masks
    def slow_write_masks(path, *args):
        real(path, *args)  # the weights and the masks are written: now we get killed
        Path({flag!r}).touch()
        time.sleep(60)
    save.write_masks = slow_write_masks
    pruned_model(seed=2).save_pretrained({target!r})
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s
def test_a_killed_save_process_leaves_the_old_folder_loadable(tmp_path):
    target, flag = tmp_path / "m", tmp_path / "writing"
    old = pruned_model(seed=1)
    old.save_pretrained(target)
    script = KILLED_SAVE.format(tests=str(Path(__file__).parents[1]), flag=str(flag), target=str(target))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the save never reached the write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert_bit_identical(state(old), load_sparse_model(target))  # the old model, intact
    (partial,) = tmp_path.glob(f"{TMP_PREFIX}*")
    with pytest.raises((OSError, ValueError), match="config.json"):  # the partial folder has no config.json
        AutoModelForCausalLM.from_pretrained(partial)
    with pytest.raises(ValueError):
        load_sparse_model(partial)
    pruned_model(seed=3).save_pretrained(tmp_path / "other")  # a later save cleans up after the dead one
    assert _no_tmp_left(tmp_path)
