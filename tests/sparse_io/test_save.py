"""Atomic saves: failing, interrupted and killed saves (hf_elsa.sparse_io.save)."""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import COMPRESSED_NAME, finish_interrupted_save
from hf_elsa.sparse_io import commit as commit_module
from hf_elsa.sparse_io import save as save_module
from hf_elsa.sparse_io.commit import IN_PLACE_PREFIX, NEW_PREFIX, OLD_PREFIX, TMP_PREFIX
from hf_elsa.sparse_io.formats import CompressedFormat

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


class Killed(BaseException):
    """The saving process died here (a BaseException, so no ``except Exception`` handler swallows it)."""


class KillSwitch:
    """Counts the file operations of a save; from the ``kill_at``-th on, each one raises :class:`Killed`.

    Once killed, every later operation fails too: a dead process does nothing more, so the cleanup handlers of
    the save cannot repair anything either. Its flocks are released when the save's file descriptors close,
    as a killed process's are.
    """

    OPS = (
        (os, "rename"),
        (os, "replace"),
        (os, "unlink"),
        (os, "remove"),
        (os, "rmdir"),
        (os, "mkdir"),
        (os, "link"),
        (os, "symlink"),
        (shutil, "copy2"),
        (commit_module, "_exchange"),
    )

    def __init__(self, monkeypatch, kill_at: int | None = None):
        self.calls, self.kill_at, self.dead, self.monkeypatch = [], kill_at, False, monkeypatch
        for owner, name in self.OPS:
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            self.calls.append(name)
            if self.dead or len(self.calls) == self.kill_at:
                self.dead = True
                raise Killed(f"killed at file operation {len(self.calls)} ({name})")
            return real(*args, **kwargs)

        return op

    def off(self):
        self.monkeypatch.undo()


def _old_folder(tmp_path, old_format: str, cache: dict) -> tuple[Path, dict]:
    """The folder a save will replace: a sparse checkpoint plus files that are not ours."""
    if old_format not in cache:
        src = tmp_path / f"old-{old_format}"
        old = pruned_model(seed=1)
        old.save_pretrained(src, format=old_format)
        (src / "tokenizer.json").write_text('{"mine": true}')
        (src / "checkpoint-1").mkdir()
        (src / "checkpoint-1" / "optimizer.pt").write_bytes(b"optimizer state")
        cache[old_format] = (src, state(old))
    src, old_state = cache[old_format]
    cache["runs"] = cache.get("runs", 0) + 1
    folder = tmp_path / f"run-{cache['runs']}" / "m"
    shutil.copytree(src, folder)
    return folder, old_state


def _which(loaded, folder: Path, old: dict, new: dict) -> str:
    got = state(loaded)
    for name, expected in (("old", old), ("new", new)):
        if all(torch.equal(got[k], v) for k, v in expected.items()):  # pruned -0.0 == +0.0: canonical zeros
            return name
    raise AssertionError(f"{folder} loads as neither the old nor the new model")


def _assert_old_or_new(folder: Path, old: dict, new: dict) -> str:
    """``folder`` loads as exactly the old or exactly the new model, with the files that are not ours.

    A load only reads: what the killed save left stays until finish_interrupted_save (or the next save)."""
    before = sorted(os.listdir(folder.parent))
    if (folder / "config.json").is_file():  # else the folder is mid-swap: nothing loads until it is finished
        _which(load_sparse_model(folder), folder, old, new)
    assert sorted(os.listdir(folder.parent)) == before  # the load deleted and moved nothing
    finish_interrupted_save(folder)
    which = _which(load_sparse_model(folder), folder, old, new)
    assert (folder / "tokenizer.json").read_text() == '{"mine": true}'
    assert (folder / "checkpoint-1" / "optimizer.pt").read_bytes() == b"optimizer state"
    leftovers = [
        p.name for p in folder.parent.iterdir() if p.name.startswith((NEW_PREFIX, OLD_PREFIX, IN_PLACE_PREFIX))
    ]
    assert not leftovers, leftovers  # finish_interrupted_save finished or undid the swap
    return which


SWAP_MODES = {
    "exchange": lambda monkeypatch: None,  # renameat2(RENAME_EXCHANGE): one step
    "two_renames": lambda monkeypatch: monkeypatch.setattr(commit_module, "_exchange", lambda a, b: False),
    "in_place": lambda monkeypatch: monkeypatch.setattr(commit_module, "_cwd_inside", lambda target: True),
}


@pytest.mark.parametrize(
    "mode, old_format, new_format",
    [
        ("exchange", "dense", "dense"),
        ("exchange", "compressed", "compressed"),
        ("exchange", "dense", "compressed"),
        ("exchange", "compressed", "dense"),
        ("two_renames", "dense", "compressed"),
        ("two_renames", "compressed", "dense"),
        ("in_place", "dense", "compressed"),
        ("in_place", "compressed", "dense"),
    ],
)
def test_a_save_killed_at_any_file_operation_leaves_the_old_or_the_new_model(
    mode, old_format, new_format, monkeypatch, tmp_path
):
    """Kill the save at its 1st, 2nd, ... file operation: the folder always loads as exactly the old or the new
    model (and keeps the files that are not ours); the load recovers, and the next save works and leaves nothing."""
    if mode == "exchange" and not commit_module._exchange(*_two_dirs(tmp_path)):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    new_model, newer = pruned_model(seed=2), pruned_model(seed=3)
    new, cache = state(new_model), {}
    folder, old = _old_folder(tmp_path, old_format, cache)
    with monkeypatch.context() as patch:
        SWAP_MODES[mode](patch)
        switch = KillSwitch(patch)
        new_model.save_pretrained(folder, format=new_format)
        switch.off()
    n_ops = len(switch.calls)
    assert n_ops >= 8, switch.calls
    seen = set()
    for kill_at in range(1, n_ops + 1):
        folder, old = _old_folder(tmp_path, old_format, cache)
        with monkeypatch.context() as patch:
            SWAP_MODES[mode](patch)
            switch = KillSwitch(patch, kill_at)
            with pytest.raises(Killed):
                new_model.save_pretrained(folder, format=new_format)
            switch.off()
        if new_format == "dense" and (folder / "config.json").exists():  # plain readers never see a wrong model
            try:
                plain = AutoModelForCausalLM.from_pretrained(folder)
            except (OSError, ValueError):
                pass
            else:
                assert any(all(torch.equal(state(plain)[k], v) for k, v in s.items()) for s in (old, new)), kill_at
        seen.add(_assert_old_or_new(folder, old, new))
        newer.save_pretrained(folder, format=new_format)  # the next save works and cleans up after the dead one
        assert_bit_identical(state(newer), load_sparse_model(folder), canonical_zero=True)
        assert [p.name for p in folder.parent.iterdir()] == ["m"], kill_at
    assert seen == {"old", "new"}  # early kills keep the old model, late ones (or the recovery) give the new


def _two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    return a, b


def test_a_folder_that_cannot_be_renamed_is_committed_in_place(monkeypatch, tmp_path):
    """A mount point (EBUSY on rename) or the working directory: the files move in one by one, config.json last."""
    folder = tmp_path / "m"
    pruned_model(seed=1).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    real_rename = os.rename

    def rename(src, dst, **kwargs):
        if Path(src) == folder:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_rename(src, dst, **kwargs)

    monkeypatch.setattr(commit_module, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EBUSY, "busy")))
    monkeypatch.setattr(os, "rename", rename)
    new = pruned_model(seed=2)
    new.save_pretrained(folder, compressed=True)
    monkeypatch.undo()
    assert_bit_identical(state(new), load_sparse_model(folder), canonical_zero=True)
    assert (folder / "tokenizer.json").exists() and not (folder / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]

    monkeypatch.chdir(folder)  # the working directory is never swapped away from under the process
    newer = pruned_model(seed=3)
    newer.save_pretrained(folder)
    assert Path(os.getcwd()).samefile(folder) and (folder / "model.safetensors").exists()
    assert_bit_identical(state(newer), load_sparse_model(folder))


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


KILLED_SWAP = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from sparse_io.helpers import pruned_model
    from hf_elsa.sparse_io import commit

    def slow_swap_in(*args):
        Path({flag!r}).touch()  # the new folder is complete, renamed .hf_elsa_new-...: now we get killed
        time.sleep(60)
    commit.swap_in = slow_swap_in
    pruned_model(seed=2).save_pretrained({target!r})
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s
def test_a_save_process_killed_before_the_swap_is_rolled_forward_by_finish_interrupted_save(tmp_path):
    target, flag = tmp_path / "m", tmp_path / "swapping"
    old, new = pruned_model(seed=1), pruned_model(seed=2)
    old.save_pretrained(target)
    script = KILLED_SWAP.format(tests=str(Path(__file__).parents[1]), flag=str(flag), target=str(target))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the save never reached the swap"
        # the save is alive (its flock is held): a load leaves its folders alone and reads the old model
        assert_bit_identical(state(old), load_sparse_model(target))
        assert len(list(tmp_path.glob(f"{NEW_PREFIX}m-*"))) == 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert_bit_identical(state(old), AutoModelForCausalLM.from_pretrained(target))  # still the old one on disk
    assert_bit_identical(state(old), load_sparse_model(target))  # a load only reads: the old model, leftovers kept
    assert len(list(tmp_path.glob(f"{NEW_PREFIX}m-*"))) == 1
    finish_interrupted_save(target)  # rolls the complete new folder forward
    assert_bit_identical(state(new), load_sparse_model(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "swapping"]


# -- non-finite weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_save_refuses_non_finite_weights_naming_them(compressed, tmp_path):
    model = pruned_model()
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight
        q.view(-1)[q.view(-1).nonzero()[:3]] = float("nan")  # kept weights: the masks still hold
        model.model.norm.weight[0] = float("inf")  # not pruned at all
    with pytest.raises(ValueError) as err:
        model.save_pretrained(tmp_path / "m", compressed=compressed)
    message = str(err.value)
    assert "2 tensors hold NaN/inf values" in message
    assert "'model.layers.0.self_attn.q_proj.weight' (3 NaN)" in message and "'model.norm.weight' (1 inf)" in message
    assert "learning_rate" in message and "Nothing was written" in message
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_the_non_finite_error_names_the_first_five_and_counts_the_rest(tmp_path):
    model = pruned_model()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.up_proj, layer.mlp.down_proj, layer.mlp.gate_proj, layer.self_attn.k_proj):
                proj.weight.view(-1)[proj.weight.view(-1).nonzero()[0]] = float("-inf")
    with pytest.raises(ValueError, match=r"8 tensors hold NaN/inf values: .*\(1 inf\), and 3 more\. Nothing"):
        model.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("later_save_won", [True, False])
def test_recovery_rolls_a_killed_save_forward_only_over_an_older_model(later_save_won, tmp_path):
    # a save killed before its swap left a complete folder. A save that started after it (while it ran, so that its
    # recovery could not touch it) and replaced the model must win; over an older model the killed save is finished
    target, killed = tmp_path / "m", tmp_path / "killed"
    saves = [(killed, 2), (target, 1)] if later_save_won else [(target, 1), (killed, 2)]
    for folder, seed in saves:
        pruned_model(seed=seed).save_pretrained(folder)
    leftover = tmp_path / f"{NEW_PREFIX}m-{commit_module.save_id_of(killed)}"
    killed.rename(leftover)
    finish_interrupted_save(target)
    assert_bit_identical(state(pruned_model(seed=1 if later_save_won else 2)), load_sparse_model(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_ids_order_saves_by_their_start():
    ids = [commit_module.new_save_id() for _ in range(200)]
    assert all(re.fullmatch(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}", i) for i in ids)  # UUIDv7
    assert len(set(ids)) == len(ids)
    assert all(a[:16] <= b[:16] for a, b in itertools.pairwise(ids))
    assert commit_module.started_before(ids[0], commit_module.new_save_id())
    legacy = "4b7cc2f1656944b189a5077628a406bc"  # a UUIDv4 of an earlier version: no order, rolled forward
    assert not commit_module.started_before(ids[0], legacy) and not commit_module.started_before(legacy, ids[0])
