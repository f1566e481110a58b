"""sparsity_report and hf-elsa inspect (hf_elsa.sparse_io.report)."""

from __future__ import annotations

import json

import pytest

from hf_elsa import sparsity_report
from hf_elsa.cli import main as cli_main
from hf_elsa.sparse_io import MASKS_NAME
from hf_elsa.targets import find_prunable_modules

from .helpers import pruned_model, tiny_model, truncate


def test_sparsity_report_of_model_and_folder(tmp_path):
    model = pruned_model("opt", sparsity=0.75)
    report = sparsity_report(model)
    assert report.sparsity == pytest.approx(0.75, abs=1e-3)
    assert len(report.tensors) == len(find_prunable_modules(model))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert 0 < report.overall_sparsity < report.sparsity
    name = report.tensors[0].name
    assert report[name].sparsity == pytest.approx(0.75, abs=1e-2)
    assert json.loads(json.dumps(report.to_dict()))["tensors"][name]["shape"] == list(report[name].shape)
    text = str(report)
    assert name in text and "75.00%" in text and "whole model" in text

    model.save_pretrained(tmp_path / "c", compressed=True)
    from_folder = sparsity_report(tmp_path / "c")
    assert from_folder.zeros == report.zeros and from_folder.total_params == report.total_params
    unattached = sparsity_report(tiny_model("opt"))  # default targets: every Linear but the LM head
    assert len(unattached.tensors) == len(report.tensors) and unattached.sparsity == 0


def test_cli_inspect(tmp_path, capsys):
    model = pruned_model("qwen2")
    model.save_pretrained(tmp_path / "c", compressed=True)
    assert cli_main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "format compressed" in out and "model.layers.1.mlp.down_proj.weight" in out and "90.0" in out
    report = sparsity_report(tmp_path / "c")
    ratio = sum(t.stored_bytes for t in report.tensors) / sum(t.dense_bytes for t in report.tensors)
    assert f"({ratio:.3f}x)" in out and ratio < 0.131  # 0.131x with raw masks; zlib pays off even on 2 KB masks

    assert cli_main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "compressed" and report["sparsity"] == pytest.approx(0.9, abs=1e-3)

    assert cli_main(["inspect", str(tmp_path / "c"), "--summary"]) == 0
    assert "layers.1" not in capsys.readouterr().out

    tiny_model().save_pretrained(tmp_path / "plain")
    assert cli_main(["inspect", str(tmp_path / "plain")]) == 0
    assert "plain" in capsys.readouterr().out

    truncate(tmp_path / "c" / MASKS_NAME)
    assert cli_main(["inspect", str(tmp_path / "c")]) == 1
    assert MASKS_NAME in capsys.readouterr().err


def test_cli_lists_subcommands(capsys):
    assert cli_main([]) == 2
    assert "inspect" in capsys.readouterr().out
