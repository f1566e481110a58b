"""Atomic replacement of a checkpoint folder, and recovery after a save was killed.

The promise: at every instant, ``target`` loads as the old model or as the new one.

1. The save writes the new checkpoint completely into ``.hf_elsa_tmp-<name>-<save_id>`` next to ``target``
   (``config.json`` held back until the rest is written, so that folder never loads). Files of ``target`` that
   are not ours (tokenizer, ``checkpoint-*`` folders, logs) are hard-linked into it (copied where the file system
   cannot link); weight files of an earlier save are left behind.
2. The finished folder is renamed ``.hf_elsa_new-<name>-<save_id>``: complete, waiting to be swapped in.
3. It is exchanged with ``target`` in one ``renameat2(RENAME_EXCHANGE)`` (Linux); elsewhere ``target`` is renamed
   ``.hf_elsa_old-<name>-<save_id>`` and the new folder takes its name. Files created in ``target`` meanwhile are
   moved over, then the old folder is deleted.

A process killed at any point leaves ``target`` intact (old or new) plus siblings that say what to do;
:func:`recover`, run by every save into the folder (and by ``finish_interrupted_save``; a load only reads), finishes
the swap (a complete new folder is rolled forward, unless a save that started after it has replaced ``target`` since)
or removes the leftovers. Each save holds an ``flock`` on its folders, so
recovery never touches a save that is still running.

Where ``target`` cannot be renamed (a mount point, the working directory of this process, a file system that
refuses), the new files are moved into it one by one with ``config.json`` last: an interruption then leaves a
folder without ``config.json`` (it loads as nothing, never as a wrong model) until :func:`recover` rolls it forward.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, recovery treats every leftover as abandoned
    fcntl = None

from .formats import stale_file_patterns
from .metadata import ELSA_CONFIG_NAME

PENDING_CONFIG = ".config.json.pending"  # config.json of a save in progress: the folder does not load yet
TMP_PREFIX = ".hf_elsa_tmp-"  # being written: incomplete
NEW_PREFIX = ".hf_elsa_new-"  # complete, to be swapped in
OLD_PREFIX = ".hf_elsa_old-"  # replaced, to be deleted
IN_PLACE_PREFIX = ".hf_elsa_inplace-"  # complete, being moved into a folder that cannot be renamed
_UNRENAMABLE = {errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES}


class CannotRename(OSError):
    """``target`` itself cannot be renamed (mount point, permissions): commit in place instead."""


class Locks(contextlib.AbstractContextManager):
    """``flock`` on folders this process is writing or replacing; released when the process ends, killed or not."""

    def __init__(self):
        self._fds: list[int] = []

    def claim(self, path: Path) -> bool:
        """Hold an exclusive lock on ``path``; False when another process holds it (a save that still runs)."""
        if fcntl is None:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return True  # gone or unreadable: nobody to wait for
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # the file system has no flock (some network mounts): proceed unlocked
            os.close(fd)
            return True
        self._fds.append(fd)
        return True

    def __exit__(self, *exc):
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def sibling(target: Path, prefix: str, save_id: str) -> Path:
    return target.parent / f"{prefix}{target.name}-{save_id}"


def _siblings(target: Path, prefix: str) -> list[tuple[Path, str]]:
    """``(path, save_id)`` of the ``prefix`` folders that belong to ``target`` (not to ``target-x``), oldest first."""
    pattern = re.compile(rf"{re.escape(prefix + target.name)}-([0-9a-f]{{32}})")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, Path(entry.path), match.group(1)))
    return [(path, save_id) for _, path, save_id in sorted(found)]


_TIME_ORDERED_ID = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}")  # UUIDv7: version 7, variant 10


def new_save_id() -> str:
    """A UUIDv7 as 32 hex digits: its first 16 order saves by the time they started (milliseconds and a 12-bit
    fraction of one), the rest is random. Tells a killed save from a later one that overtook it (:func:`recover`)."""
    now = time.time_ns()
    millis, fraction = divmod(now, 1_000_000)
    value = (millis << 80) | (0x7 << 76) | ((fraction * 4096 // 1_000_000) << 64) | (0b10 << 62) | secrets.randbits(62)
    return f"{value:032x}"


def started_before(save_id: str, other: str | None) -> bool:
    """Whether the save ``save_id`` started before the save ``other``; False when either id does not say (a UUIDv4
    of an earlier hf_elsa, or no id): then the complete folder is rolled forward, as it always was."""
    if other is None or not (_TIME_ORDERED_ID.fullmatch(save_id) and _TIME_ORDERED_ID.fullmatch(other)):
        return False
    return save_id[:16] < other[:16]


def save_id_of(folder: Path) -> str | None:
    """The ``save_id`` in ``folder/config.json`` (None when there is none or it cannot be read)."""
    try:
        entry = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("elsa_sparsity")
        return entry.get("save_id") if isinstance(entry, dict) else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _is_carried(name: str, present: set[str]) -> bool:
    """A file of the old folder the new one keeps: not ours (present), not a weight file of an earlier save."""
    if name in present or name in ("config.json", PENDING_CONFIG):
        return False
    return not any(fnmatch.fnmatch(name, p) for p in stale_file_patterns())


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if not os.path.isfile(src):
            raise
        shutil.copy2(src, dst)


def carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that are not the checkpoint's own files."""
    present = set(os.listdir(new))
    for entry in os.scandir(old):
        if not _is_carried(entry.name, present):
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _move_late_entries(old: Path, new: Path) -> None:
    """Entries created in the old folder after :func:`carry_over` looked at it: move them into the new one."""
    present = set(os.listdir(new))
    for name in os.listdir(old):
        if _is_carried(name, present):
            os.rename(old / name, new / name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_RENAMEAT2 = []


def _renameat2():
    if not _RENAMEAT2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError, TypeError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def _cwd_inside(target: Path) -> bool:
    try:
        cwd = Path(os.getcwd())
    except OSError:
        return False
    return cwd == target or target in cwd.parents


def swap_in(new: Path, target: Path, save_id: str, locks: Locks) -> None:
    """Make the complete folder ``new`` the contents of ``target``; every intermediate state is recoverable."""
    if _cwd_inside(target):
        raise CannotRename(errno.EBUSY, "the working directory is inside the folder", str(target))
    if not os.path.lexists(target):
        try:
            os.rename(new, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # created meanwhile: swap with it below
    if not locks.claim(target):
        raise RuntimeError(f"{target}: another process is saving into this folder; save again when it is done.")
    old = sibling(target, OLD_PREFIX, save_id)
    try:
        exchanged = _exchange(new, target)
        if exchanged:
            os.rename(new, old)
        else:
            os.rename(target, old)
    except OSError as exc:
        if exc.errno in _UNRENAMABLE:
            raise CannotRename(exc.errno, exc.strerror, str(target)) from exc
        raise
    if not exchanged:
        os.rename(new, target)
    _move_late_entries(old, target)
    shutil.rmtree(old)


def commit_in_place(new: Path, target: Path) -> None:
    """Move the checkpoint's files from ``new`` into ``target`` itself, ``config.json`` last.

    For a ``target`` that cannot be renamed. ``target``'s ``config.json`` goes first, so until the new one
    arrives the folder does not load (and :func:`recover` finishes the move). Weight files of an earlier save that
    the new ``elsa_config.json`` does not list are deleted before the new ``config.json`` moves in. Entries of
    ``new`` that are links of ``target``'s own entries, and folders, are left where they are.
    """
    (target / "config.json").unlink(missing_ok=True)
    ours = {e.name for e in os.scandir(new) if e.is_file(follow_symlinks=False) and not _same(e.path, target / e.name)}
    for name in sorted(ours - {"config.json"}):
        os.replace(new / name, target / name)
    listed = _listed_files(target)
    if listed is not None:
        stale = stale_file_patterns()
        for name in os.listdir(target):
            if name not in listed and any(fnmatch.fnmatch(name, p) for p in stale) and (target / name).is_file():
                (target / name).unlink()
    if "config.json" in ours:
        os.replace(new / "config.json", target / "config.json")
    shutil.rmtree(new)


def _listed_files(folder: Path) -> set[str] | None:
    """The files the ``elsa_config.json`` of ``folder`` lists, itself included (None when unreadable)."""
    try:
        files = json.loads((folder / ELSA_CONFIG_NAME).read_text(encoding="utf-8"))["files"]
        return {*files, ELSA_CONFIG_NAME} if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def commit(tmp: Path, target: Path, save_id: str, locks: Locks) -> None:
    """Publish the finished save in ``tmp`` (its ``config.json`` final) as ``target``."""
    new = sibling(target, NEW_PREFIX, save_id)
    os.rename(tmp, new)  # complete: from here on, recovery rolls it forward
    _publish(new, target, save_id, locks)


def _publish(new: Path, target: Path, save_id: str, locks: Locks) -> None:
    try:
        swap_in(new, target, save_id, locks)
    except CannotRename:
        # from the first file moved on, only an in-place move can finish this: say so in the name
        in_place = sibling(target, IN_PLACE_PREFIX, save_id)
        os.rename(new, in_place)
        commit_in_place(in_place, target)


def recover(target: Path) -> None:
    """Finish or undo what saves into ``target`` that were killed left next to it; saves still running are left
    alone. A complete new folder is swapped in (rolled forward); a replaced old one is deleted, or put back when
    ``target`` is missing."""
    if not target.parent.is_dir():
        return
    with Locks() as locks:
        for moving, save_id in _siblings(target, IN_PLACE_PREFIX):
            if not locks.claim(moving):
                continue
            if save_id_of(target) == save_id:
                shutil.rmtree(moving)  # the move finished: only links of the folder's own files are left
            elif os.path.isdir(target):
                commit_in_place(moving, target)
            else:
                os.rename(moving, target)
        for new, save_id in _siblings(target, NEW_PREFIX):
            if not locks.claim(new):
                continue
            if os.path.lexists(target) and save_id_of(target) == save_id:
                _move_late_entries(new, target)  # swapped in already: this is the old folder under the new name
                shutil.rmtree(new)
            elif started_before(save_id, save_id_of(target)):  # stale: a save started after it replaced target
                shutil.rmtree(new)
            else:
                _publish(new, target, save_id, locks)
        for old, _ in _siblings(target, OLD_PREFIX):
            if not locks.claim(old):
                continue
            if os.path.lexists(target):
                _move_late_entries(old, target)
                shutil.rmtree(old)
            else:
                os.rename(old, target)  # the new folder never arrived: the old one is the model


def is_locked(path: Path) -> bool:
    """Whether another process holds ``path``'s save lock (a save that is running). Reads only: a shared lock
    taken and released at once."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the shared lock, if taken
    return False


def pending_saves(target: Path) -> tuple[list[Path], list[Path]]:
    """``(running, abandoned)``: the sibling folders of saves into ``target`` (``.hf_elsa_tmp-``, ``-new-``,
    ``-old-``, ``-inplace-``), split by whether their save still holds its lock."""
    running, abandoned = [], []
    for prefix in (TMP_PREFIX, NEW_PREFIX, OLD_PREFIX, IN_PLACE_PREFIX):
        for path, _ in _siblings(target, prefix):
            (running if is_locked(path) else abandoned).append(path)
    return running, abandoned


def remove_abandoned(parent: Path) -> None:
    """Remove the temporary folders of killed saves in ``parent`` (any target; unlocked means abandoned)."""
    with Locks() as locks:
        for path in parent.glob(f"{TMP_PREFIX}*"):
            if path.is_dir() and not path.is_symlink() and locks.claim(path):
                shutil.rmtree(path, ignore_errors=True)
