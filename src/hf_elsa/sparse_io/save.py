"""Saving an attached model: the sparse ``save_pretrained``, written in a temporary folder and committed atomically.

Everything is written into a temporary sibling folder and moved into place with ``config.json`` last, so an
interrupted save leaves either the old folder or one without ``config.json`` -- never a folder that loads as a
wrong model.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from safetensors import safe_open

from ..version import __version__
from .card import build_model_card, merge_card
from .files import file_info, saved_weight_files
from .formats import SaveFormat, resolve_format, stale_file_patterns
from .hub import HUB_KWARGS, check_online, create_repo, upload
from .masks import write_masks
from .metadata import CARD_NAME, CONFIG_KEY, ELSA_CONFIG_NAME, FORMAT_VERSION, MASKS_NAME
from .report import report_from_config
from .state import SparsityState, measure, require_state

PENDING_CONFIG = ".config.json.pending"  # config.json of a save in progress: the folder does not load yet
TMP_PREFIX = ".hf_elsa_tmp-"


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
    """Write the checkpoint into a temporary sibling folder, then commit it into ``target``; returns its files."""
    measure(state, params.get("state_dict") or model.state_dict(), f"save_pretrained({str(target)!r})")
    config = state.config
    config.hf_elsa_version = __version__
    config.elsa_format_version = FORMAT_VERSION  # a loaded older (or newer) folder is re-saved in this layout
    config.format = fmt.name
    config.save_id = uuid.uuid4().hex

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp_folders(target.parent)
    tmp = Path(
        tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-{socket.gethostname()}-{os.getpid()}-", dir=target.parent)
    )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the renamed folder should look like makedirs'
    model_config = getattr(model, "config", None)
    had_entry, old_entry = hasattr(model_config, CONFIG_KEY), getattr(model_config, CONFIG_KEY, None)
    try:
        setattr(model_config, CONFIG_KEY, fmt.config_entry(config))
        try:
            cls.save_pretrained(model, tmp, push_to_hub=False, **params)
        finally:
            if had_entry:
                setattr(model_config, CONFIG_KEY, old_entry)
            else:
                delattr(model_config, CONFIG_KEY)
        # until the commit, the temporary folder must not load as a model
        os.replace(tmp / "config.json", tmp / PENDING_CONFIG)
        weight_files = saved_weight_files(tmp)
        _check_saved_keys(tmp, weight_files, state)
        write_masks(tmp / MASKS_NAME, state.masks, config.save_id)
        weight_files = fmt.write(tmp, weight_files, state.masks, config.save_id)
        config.files = {name: file_info(tmp / name) for name in [*weight_files, MASKS_NAME]}
        (tmp / ELSA_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        card = build_model_card(config, report_from_config(config, model), tags=tags)
        (tmp / CARD_NAME).write_text(merge_card(target / CARD_NAME, str(card)), encoding="utf-8")
        written = sorted(os.listdir(tmp))
        commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ["config.json" if name == PENDING_CONFIG else name for name in written]


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


def commit(tmp: Path, target: Path) -> None:
    """Move a finished save from ``tmp`` into ``target``, ``config.json`` last.

    A new folder is one rename. An existing one keeps files that are not ours (tokenizer, checkpoints,
    logs): its ``config.json`` goes first, then stale weight files, then the new files move in and the new
    ``config.json`` last -- so an interruption leaves the old folder or one that does not load.
    """
    if not target.exists():
        try:
            os.rename(tmp, target)
            tmp = target
        except OSError:  # created meanwhile: fall through to the in-place commit
            pass
    if tmp != target:
        (target / "config.json").unlink(missing_ok=True)
        new = set(os.listdir(tmp))
        stale = stale_file_patterns()
        for name in os.listdir(target):
            if name not in new and any(fnmatch.fnmatch(name, p) for p in stale) and (target / name).is_file():
                (target / name).unlink()
        for name in sorted(new - {PENDING_CONFIG}):
            os.replace(tmp / name, target / name)
        os.replace(tmp / PENDING_CONFIG, target / PENDING_CONFIG)
        tmp.rmdir()
    os.replace(target / PENDING_CONFIG, target / "config.json")


def remove_dead_tmp_folders(parent: Path) -> None:
    """Remove temporary folders that killed saves on this host left behind (their process is gone)."""
    pattern = re.compile(rf"-{re.escape(socket.gethostname())}-(\d+)-[A-Za-z0-9_]+$")
    for path in parent.glob(f"{TMP_PREFIX}*"):
        match = pattern.search(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive but not ours to signal
            continue
