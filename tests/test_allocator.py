"""The CLI's allocator tuning for CPU runs (hf_elsa._allocator)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

import hf_elsa.cli
from hf_elsa._allocator import _ENVIRONMENT, keep_freed_memory


def test_applied_on_glibc_linux_only(monkeypatch):
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


@pytest.mark.parametrize("name,value", [("MALLOC_MMAP_MAX_", "65536"), ("LD_PRELOAD", "libjemalloc.so.2")])
def test_the_users_own_allocator_settings_win(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False


def test_every_cli_command_on_the_cpu_tunes_it(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hf_elsa.cli, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hf_elsa.cli.main(["inspect", str(tmp_path / "missing")])  # fails cleanly after the tuning
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hf_elsa.cli.main(["inspect", str(tmp_path / "missing")])
    assert calls == [1]  # not on a GPU machine: host memory there is not the training loop's
