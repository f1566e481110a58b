"""Fixtures of the sparse_io tests: offline by default, and a fake Hub that records uploads."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import RepoUrl


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercept the Hub calls; record what would be uploaded (file names and a copy of the text files)."""
    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        texts = {f: (Path(folder_path) / f).read_text() for f in files if f.endswith((".json", ".md"))}
        calls["upload_folder"].append({"repo_id": repo_id, "files": files, "texts": texts, **kwargs})
        return "https://huggingface.co/commit/fake"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # nothing leaves: API patched
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls
