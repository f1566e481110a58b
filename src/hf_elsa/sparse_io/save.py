"""Saving an attached model: the sparse ``save_pretrained``, written in a temporary sibling folder and swapped in
for the target folder atomically (:mod:`.commit`): at every instant the folder loads as the old model or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import threading
from pathlib import Path

from safetensors import safe_open

from ..version import __version__
from .card import build_model_card, merge_card
from .commit import (
    PENDING_CONFIG,
    TMP_PREFIX,
    Locks,
    carry_over,
    commit,
    new_save_id,
    recover,
    remove_abandoned,
    sibling,
)
from .files import file_info, saved_weight_files
from .formats import SaveFormat, resolve_format
from .hub import HUB_KWARGS, check_online, create_repo, upload
from .masks import write_masks
from .metadata import CARD_NAME, CONFIG_KEY, ELSA_CONFIG_NAME, FORMAT_VERSION, MASKS_NAME
from .report import report_from_config
from .state import SparsityState, check_finite, measure, require_state


def sparse_save_pretrained(model, cls, save_directory, compressed: bool = False, format: str | None = None, **params):
    """``save_pretrained`` of an attached model: ``params`` are the original method's arguments, by name."""
    state = require_state(model)
    if params.get("distributed_checkpoint"):
        raise NotImplementedError(
            "hf_elsa sparse saves do not support distributed_checkpoint=True: pass distributed_checkpoint=False "
            "(weights are gathered on rank 0), or detach_sparsity(model) for a plain distributed checkpoint."
        )
    fmt = resolve_format(format, compressed)
    fmt.check_save(params)
    push = params.pop("push_to_hub", False)
    hub = {k: params.pop(k) for k in HUB_KWARGS if k in params}
    tags, private = hub.pop("tags", None), hub.pop("private", None)
    if not params.get("is_main_process", True):
        # other ranks only join the collectives of the original save; the main process writes everything
        return cls.save_pretrained(model, save_directory, **params)
    target = Path(save_directory)
    if push:
        check_online("save_pretrained(push_to_hub=True)")
        hub["repo_id"] = create_repo(hub.get("repo_id") or target.name, params.get("token"), private)
    written = save_sparse(model, cls, state, target, fmt, params, tags=tags)
    if push:
        return upload(target, written, token=params.get("token"), **hub)
    return None


def save_sparse(model, cls, state: SparsityState, target: Path, fmt: SaveFormat, params: dict, tags=None) -> list[str]:
    """Write the checkpoint into a temporary sibling folder, then swap it in for ``target`` (:mod:`.commit`);
    returns the files of the checkpoint."""
    where = f"save_pretrained({str(target)!r})"
    tensors = params.get("state_dict") or model.state_dict()
    check_finite(tensors, where)
    measure(state, tensors, where)
    config = state.config
    config.hf_elsa_version = __version__
    config.elsa_format_version = FORMAT_VERSION  # a loaded older (or newer) folder is re-saved in this layout
    config.format = fmt.name
    config.save_id = new_save_id()

    target = Path(os.path.realpath(target))  # a symlinked folder: replace the real one, keep the link
    if target.exists() and not target.is_dir():
        raise ValueError(f"{where}: {target} is a file, not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)  # an earlier save into this folder that was killed: finish or undo it first
    remove_abandoned(target.parent)
    with Locks() as locks, _sigterm_as_exit():
        tmp = sibling(target, TMP_PREFIX, config.save_id)
        os.mkdir(tmp)
        locks.claim(tmp)
        try:
            written = _write(model, cls, state, fmt, params, tmp, target, tags)
            commit(tmp, target, config.save_id, locks)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return written


@contextlib.contextmanager
def _sigterm_as_exit():
    """During a save, SIGTERM (``kill PID``, a scheduler's stop, a timeout) raises ``SystemExit(143)`` like Ctrl-C
    raises ``KeyboardInterrupt``, so the temporary copy is removed before the process ends instead of staying until
    the next save. Only where Python's default handler is in place (never over a handler of the application), and
    only in the main thread (where signal handlers run)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write(model, cls, state: SparsityState, fmt: SaveFormat, params: dict, tmp: Path, target: Path, tags) -> list[str]:
    """The complete checkpoint in ``tmp``, ``config.json`` last; the files of ``target`` that are not ours are
    carried over (hard links). Returns the checkpoint's own files."""
    config = state.config
    mode = os.stat(target).st_mode if target.is_dir() else 0o777 & ~_umask()
    os.chmod(tmp, stat.S_IMODE(mode))  # the new folder replaces the old one: same permissions
    model_config = getattr(model, "config", None)
    had_entry, old_entry = hasattr(model_config, CONFIG_KEY), getattr(model_config, CONFIG_KEY, None)
    setattr(model_config, CONFIG_KEY, fmt.config_entry(config))
    try:
        cls.save_pretrained(model, tmp, push_to_hub=False, **params)
    finally:
        if had_entry:
            setattr(model_config, CONFIG_KEY, old_entry)
        else:
            delattr(model_config, CONFIG_KEY)
    # until it is complete, the temporary folder must not load as a model
    os.replace(tmp / "config.json", tmp / PENDING_CONFIG)
    weight_files = saved_weight_files(tmp)
    _check_saved_keys(tmp, weight_files, state)
    write_masks(tmp / MASKS_NAME, state.masks, config.save_id)
    weight_files = fmt.write(tmp, weight_files, state.masks, config.save_id)
    config.files = {name: file_info(tmp / name) for name in [*weight_files, MASKS_NAME]}
    config.files["config.json"] = file_info(tmp / PENDING_CONFIG)
    (tmp / ELSA_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    card = build_model_card(config, report_from_config(config, model), tags=tags)
    (tmp / CARD_NAME).write_text(merge_card(target / CARD_NAME, str(card)), encoding="utf-8")
    written = ["config.json" if name == PENDING_CONFIG else name for name in sorted(os.listdir(tmp))]
    if target.is_dir():
        carry_over(target, tmp)
    os.replace(tmp / PENDING_CONFIG, tmp / "config.json")  # complete
    return written


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _check_saved_keys(folder: Path, weight_files: list[str], state: SparsityState) -> None:
    """Every masked tensor must be in the saved weights under its own name (not dropped as tied, not renamed)."""
    saved = set()
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(folder / name, "pt") as f:
                saved.update(f.keys())
    missing = sorted(set(state.masks) - saved)
    if missing:
        raise ValueError(
            f"save_pretrained: masked tensors {missing[:5]} are not saved under their own names (tied to another "
            "weight or renamed on save); hf_elsa cannot store their masks -- exclude them from pruning."
        )
