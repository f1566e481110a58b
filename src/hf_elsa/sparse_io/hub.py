"""Uploading sparse checkpoints to the Hugging Face Hub (``push_to_hub`` of an attached model)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..version import __version__
from .formats import stale_file_patterns

# the save_pretrained arguments that describe the upload, not the folder
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "tags")


def check_online(what: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            f"{what}: offline mode is on (HF_HUB_OFFLINE=1), the Hugging Face Hub cannot be reached. Save locally "
            "(push_to_hub=False) and upload the folder later with `hf upload REPO_ID FOLDER`, or unset HF_HUB_OFFLINE."
        )


def _hf_api():
    from huggingface_hub import HfApi

    return HfApi(library_name="hf_elsa", library_version=__version__)


def create_repo(repo_id: str, token=None, private=None) -> str:
    return _hf_api().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def upload(
    folder: Path,
    files: list[str],
    repo_id: str,
    token=None,
    commit_message=None,
    commit_description=None,
    create_pr=False,
    revision=None,
):
    """Upload the files of one save; weight files of another format left on the Hub are deleted."""
    return _hf_api().upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=files,
        delete_patterns=list(stale_file_patterns()),
        commit_message=commit_message or "Upload sparse model (hf_elsa)",
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def sparse_push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size="50GB",
    tags: list[str] | None = None,
    compressed: bool = False,
    **kwargs,
):
    """``push_to_hub`` of an attached model: the sparse checkpoint (``compressed`` or dense) and its card.

    ``format=`` (in ``kwargs``) picks any registered format, as for ``save_pretrained``.
    """
    check_online("push_to_hub")
    repo_id = create_repo(repo_id, token, private)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        self.save_pretrained(folder, compressed=compressed, max_shard_size=max_shard_size, tags=tags, **kwargs)
        return upload(
            folder,
            sorted(os.listdir(folder)),
            repo_id,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            revision=revision,
        )
