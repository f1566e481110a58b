"""Loading a sparse checkpoint (any registered format, local folder or Hub repo) and verifying it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .attach import attach_sparsity
from .commit import PENDING_CONFIG, is_locked, pending_saves, save_id_of
from .files import check_inside, read_json, saved_weight_files, sha256, shard_files
from .formats import get_format
from .masks import read_masks
from .metadata import CONFIG_KEY, ELSA_CONFIG_NAME, MASKS_NAME, ElsaSparsityConfig, config_json_entry
from .state import SparsityState, check_masks, describe_non_finite, non_finite

logger = logging.getLogger(__name__)
DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only")


ATTEMPTS = 5  # loads started over when the folder was swapped while being read
RETRY_PAUSE_S = 0.05  # doubled at each new attempt
WAIT_FOR_SAVE_S = 600.0  # longest wait for a running save whose swap left the folder incomplete for now


def load_sparse_model(
    path_or_repo_id: str | os.PathLike, *, verify: bool = True, allow_non_finite: bool = False, **from_pretrained_kwargs
):
    """Load a sparse checkpoint (dense or compressed format) from a folder or a Hub repo id.

    The masks are restored (:func:`attach_sparsity`), so the model can be re-saved, pushed or fine-tuned
    with ``ElsaConfig(keep_mask=True)``. ``from_pretrained_kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ...); ``revision``, ``cache_dir``, ``token``, ``force_download`` and
    ``local_files_only`` also select the Hub download.

    Raises ``ValueError`` naming the file (and key or tensor) when a file is missing, truncated or corrupted
    (size and SHA-256 are checked unless ``verify=False``), when the metadata is malformed, when a listed file
    lies outside the folder, when a mask's shape differs from its weight (checked before the mask is decoded),
    when a weight is nonzero where its mask prunes it, or when a weight holds NaN/inf (``allow_non_finite=True``
    loads it anyway).

    A load only reads. When another process swaps a save into the folder meanwhile, the load starts over and
    returns the old or the new model, never a mix; while a save holds the folder incomplete (a folder that cannot
    be renamed is filled file by file) it waits. What a killed save left next to the folder is not touched (the
    next save into the folder, or :func:`~hf_elsa.sparse_io.finish_interrupted_save`, finishes or removes it).
    """
    where = f"load_sparse_model({str(path_or_repo_id)!r})"
    local = Path(os.path.realpath(Path(path_or_repo_id).expanduser()))
    is_local = local.parent.is_dir() and (local.exists() or not _looks_like_repo_id(path_or_repo_id))
    if is_local:
        _say_leftovers(local, where)
    pause, waited = RETRY_PAUSE_S, 0.0
    for attempt in range(1, ATTEMPTS + 1):
        before = folder_identity(local) if is_local else None
        try:
            model = _load_once(path_or_repo_id, where, verify, allow_non_finite, dict(from_pretrained_kwargs))
        except (ValueError, OSError):
            if not is_local:
                raise
            running, _ = pending_saves(local)
            if running and waited < WAIT_FOR_SAVE_S:  # a save is swapping in: read the folder once it is done
                waited += _wait_for(running)
                continue
            if folder_identity(local) == before:
                raise  # the folder did not change: the error is about the folder itself
        else:
            if not is_local or folder_identity(local) == before:
                return model
        time.sleep(pause)
        pause *= 2
    raise ValueError(
        f"{where}: the folder changed {ATTEMPTS} times while it was being read (other processes keep saving into "
        "it); load it when they are done, or from a copy."
    )


def _looks_like_repo_id(name) -> bool:
    text = str(name)
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and not os.path.exists(text)


def folder_identity(folder: Path) -> tuple | None:
    """What changes when a save is swapped in: the folder's inode (a rename or exchange) and its ``save_id``."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino, save_id_of(folder)


def _wait_for(running: list[Path], step: float = 0.2) -> float:
    """Sleep until no folder of ``running`` is locked any more (or one ``step``); returns the seconds waited."""
    start = time.monotonic()
    time.sleep(step)
    while any(is_locked(p) for p in running) and time.monotonic() - start < 5.0:
        time.sleep(step)
    return time.monotonic() - start


def _say_leftovers(target: Path, where: str) -> None:
    """A killed save left folders next to ``target``: say so, and how to finish (a load does not write)."""
    _, abandoned = pending_saves(target)
    if abandoned:
        logger.warning(
            "%s: a save into this folder was killed and left %s next to it; the folder itself is read as it is. The "
            "next save into it finishes or removes them, or call hf_elsa.sparse_io.finish_interrupted_save(%r).",
            where,
            ", ".join(p.name for p in abandoned[:3]),
            str(target),
        )


def _load_once(path_or_repo_id, where: str, verify: bool, allow_non_finite: bool, from_pretrained_kwargs: dict):
    folder = _resolve_folder(path_or_repo_id, from_pretrained_kwargs)
    for key in DOWNLOAD_KWARGS:
        from_pretrained_kwargs.pop(key, None)
    check_inside(folder, ["config.json", ELSA_CONFIG_NAME], where)
    config = read_elsa_config(folder)
    fmt = get_format(config.format)
    weight_files = saved_weight_files(folder)
    check_inside(folder, [*config.files, MASKS_NAME, *weight_files], folder / ELSA_CONFIG_NAME)
    for index in (n for n in weight_files if n.endswith(".index.json")):  # transformers opens what the index names
        check_inside(folder, shard_files(folder, index), folder / index)
    if verify:
        verify_files(folder, config)
    shapes, shapes_source = fmt.weight_shapes(folder, from_pretrained_kwargs.get("trust_remote_code", False))
    masks = read_masks(folder / MASKS_NAME, config.save_id, shapes, shapes_source)
    model = fmt.load(folder, masks, config.save_id, from_pretrained_kwargs)
    tensors = model.state_dict()
    if not allow_non_finite and (found := non_finite(tensors)):
        raise ValueError(
            f"{where}: {describe_non_finite(found)}. The checkpoint was saved from a diverged run (by an hf_elsa that "
            "did not refuse such saves) or written by another tool. Pass allow_non_finite=True to load it anyway "
            "(e.g. to inspect it)."
        )
    state = SparsityState(masks=masks, config=config)
    check_masks(state, tensors, where)
    model.elsa_sparsity = state
    attach_sparsity(model, None)  # re-patch save_pretrained / push_to_hub with this state
    return model


def _resolve_folder(path_or_repo_id, kwargs: dict) -> Path:
    """A local folder, or the snapshot of a Hub repo (``huggingface_hub.snapshot_download``)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        _, abandoned = pending_saves(Path(os.path.realpath(path)))
        killed = (
            f" A save into it was killed mid-swap and left {abandoned[0].name}: call "
            f"hf_elsa.sparse_io.finish_interrupted_save({name!r}) to finish it (or save into the folder again)."
            if abandoned
            else ""
        )
        raise FileNotFoundError(
            f"load_sparse_model: {name!r} is not a folder (and not a Hub repo id such as 'user/model').{killed}"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    download = {k: kwargs[k] for k in DOWNLOAD_KWARGS if k in kwargs}
    try:
        return Path(snapshot_download(name, **download))
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode() or download.get("local_files_only"):
            raise OSError(
                f"load_sparse_model({name!r}): offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True) and this "
                "repo is not in the local Hugging Face cache. Pass a local folder, or download it once online "
                f"(`hf download {name}`)."
            ) from exc
        raise


def read_elsa_config(folder: Path) -> ElsaSparsityConfig:
    """``elsa_config.json``, cross-checked with ``config.json`` (same save)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        pending = " (a save into it was interrupted)" if (folder / PENDING_CONFIG).exists() else ""
        raise ValueError(f"{folder}: no config.json{pending}; this is not a complete checkpoint.")
    entry = config_json_entry(read_json(config_path), config_path)
    path = folder / ELSA_CONFIG_NAME
    if not path.is_file():
        if entry:
            raise ValueError(
                f"{folder}: config.json carries {CONFIG_KEY} but {ELSA_CONFIG_NAME} is missing -- the folder was rewritten "
                "by a plain save_pretrained, so its masks are gone and its sparsity is not guaranteed. Load it with "
                "AutoModelForCausalLM.from_pretrained, or re-save it from hf_elsa."
            )
        raise ValueError(
            f"{folder}: no {ELSA_CONFIG_NAME}, this is not an hf_elsa sparse checkpoint. Load it with "
            "AutoModelForCausalLM.from_pretrained (then attach_sparsity(model, masks) to record masks)."
        )
    config = ElsaSparsityConfig.from_dict(read_json(path), source=str(path))
    get_format(config.format, source=path)
    if not entry or entry.get("save_id") != config.save_id:
        raise ValueError(
            f"{folder}: config.json and {ELSA_CONFIG_NAME} come from different saves (save_id "
            f"{(entry or {}).get('save_id')} vs {config.save_id}): an interrupted copy, or a plain save_pretrained over "
            "an hf_elsa folder. Re-save the model with hf_elsa."
        )
    return config


def verify_files(folder: Path, config: ElsaSparsityConfig) -> None:
    """Size and SHA-256 of every file ``elsa_config.json`` lists."""
    if not config.files:
        raise ValueError(
            f"{folder / ELSA_CONFIG_NAME}: lists no files; cannot verify the checkpoint (verify=False skips)."
        )
    # config.json last: a rewritten weight file is the more telling error
    for name, info in sorted(config.files.items(), key=lambda item: item[0] == "config.json"):
        path = folder / name
        if not path.is_file():
            raise ValueError(
                f"{path} is missing but {ELSA_CONFIG_NAME} lists it: download or copy the whole folder again."
            )
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise ValueError(
                f"{path} has {size} bytes, {info.get('bytes')} were saved: the file is truncated or was rewritten "
                "outside hf_elsa. Download or copy it again."
            )
        if sha256(path) != info.get("sha256"):
            raise ValueError(
                f"{path}: SHA-256 differs from {ELSA_CONFIG_NAME}: the file is corrupted or was rewritten outside "
                "hf_elsa (e.g. a plain save_pretrained into this folder). Download it again, or pass verify=False to "
                "check only masks against zeros."
            )
