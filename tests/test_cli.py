"""The hf-elsa command line on a tiny model saved to disk (offline)."""

import json

import torch
from conftest import make_char_tokenizer, make_model

from hf_elsa import load_sparse_model, sparsity_report
from hf_elsa.cli import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _base_folder(tmp_path):
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    files = []
    for i in range(6):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"Document {i}. " + TEXT)
        files.append(str(path))
    return str(base), files


def test_prune_eval_inspect_round_trip(tmp_path, capsys):
    base, files = _base_folder(tmp_path)
    out = str(tmp_path / "pruned")
    common = ["--text", *files, "--block_size", "16", "--eval_seqlen", "16", "--eval_windows", "2"]
    status = main(["prune", "--model", base, *common, "--output_dir", out, "--sparsity", "0.5", "--max_steps", "4",
                   "--admm_interval", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                   "--per_device_train_batch_size", "2"])
    assert status == 0
    assert "held-out perplexity" in capsys.readouterr().out
    model = load_sparse_model(out, dtype=torch.float32)
    assert abs(sparsity_report(model).sparsity - 0.5) < 1e-6

    assert main(["eval", "--model", out, *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1.0

    assert main(["inspect", out, "--summary"]) == 0
    assert "50.0" in capsys.readouterr().out


def test_prune_rejects_bad_field_before_loading(tmp_path, capsys):
    status = main(["prune", "--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"),
                   "--sparsity", "1.5"])
    assert status == 1
    err = capsys.readouterr().err
    assert "ElsaConfig.sparsity=1.5" in err and "[0.0, 1.0)" in err


def test_unknown_option_for_inspect_is_an_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--bogus"])
