"""The hf-elsa command line on a tiny model saved to disk (offline)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_char_tokenizer, make_model

from hf_elsa import load_sparse_model, perplexity, sparsity_report
from hf_elsa.cli import COMMANDS, layer_chart, main
from hf_elsa.data import tokenize_documents

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
TRAIN = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "2",
         "--disable_tqdm", "true", "--admm_interval", "1"]  # fmt: skip
SMALL = ["--block_size", "16", "--eval_seqlen", "16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return str(folder)


def _files(tmp_path, n=6):
    files = []
    for i in range(n):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"Document {i}. " + TEXT)
        files.append(str(path))
    return files


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prune_eval_inspect_round_trip(base, tmp_path, capsys):
    files = _files(tmp_path)
    out = str(tmp_path / "pruned")
    status = main(["prune", "--model_name_or_path", base, "--text_files", *files, *SMALL, "--eval_windows", "2",
                   "--output_dir", out, "--sparsity", "0.5", "--max_steps", "4", *TRAIN])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "1 of 6 documents held out" in printed
    model = load_sparse_model(out, dtype=torch.float32)
    assert abs(sparsity_report(model).sparsity - 0.5) < 1e-6
    # evaluated before the save: the result is in the metadata and the card
    meta = json.loads((tmp_path / "pruned" / "elsa_config.json").read_text())
    assert meta["evaluation"]["results"]["perplexity"] > 1.0
    protocol = meta["evaluation"]["protocol"]
    assert "2 non-overlapping 16-token windows" in protocol["description"]
    assert (
        protocol["training_data"]
        == "6 text file(s); 1 of 6 documents held out (seed 0); 566 training blocks of 16 tokens"
    )
    assert "Not evaluated yet" not in (tmp_path / "pruned" / "README.md").read_text()

    # eval scores exactly the files it is given: all of them, every window
    assert main(["eval", "--model_name_or_path", out, "--text_files", *files[:2], "--eval_seqlen", "16"]) == 0
    result = _last_json(capsys)
    ids = tokenize_documents([Path(f).read_text() for f in files[:2]], make_char_tokenizer())
    assert result["tokens"] == ids.numel() and result["windows"] == ids.numel() // 16
    assert math.isclose(result["perplexity"], perplexity(model, text=ids, seqlen=16), rel_tol=1e-5)

    assert main(["inspect", out, "--summary"]) == 0
    assert "50.0" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_one_file_and_old_flag_names(base, tmp_path, capsys):
    """One file (one document) works: the token stream is split; --model/--text still work."""
    (path,) = _files(tmp_path, 1)
    out = tmp_path / "one"
    assert main(["prune", "--model", base, "--text", path, *SMALL, "--output_dir", str(out), "--max_steps", "2",
                 "--admm_fraction", "0.5", *TRAIN]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "the last" in printed and "tokens held out" in printed and "held-out perplexity" in printed
    # --eval_fraction 0: everything trains, nothing is evaluated
    assert main(["prune", "--model_name_or_path", base, "--text_files", path, *SMALL, "--eval_fraction", "0",
                 "--output_dir", str(tmp_path / "all"), "--max_steps", "2", "--admm_fraction", "0.5", *TRAIN]) == 0  # fmt: skip
    assert "not evaluated" in capsys.readouterr().out


def test_yaml_config_with_command_line_override(base, tmp_path, capsys):
    files = _files(tmp_path, 3)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {base}\ntext_files: {json.dumps(files)}\nblock_size: 16\neval_seqlen: 16\n"
        f"output_dir: {tmp_path / 'y'}\nsparsity: 0.5\nmax_steps: 3\nlearning_rate: 1e-3\nuse_cpu: true\n"
        "report_to: none\nsave_strategy: no\nper_device_train_batch_size: 2\ndisable_tqdm: true\n"
        "admm_fraction: 0.5\neval_fraction: 0\ncompressed: true\n"
    )
    assert main(["prune", "--config", str(config), "--sparsity", "0.6"]) == 0
    model = load_sparse_model(tmp_path / "y")
    assert abs(sparsity_report(model).sparsity - 0.6) < 1e-3  # the command line wins (0.5 in the YAML)
    meta = json.loads((tmp_path / "y" / "elsa_config.json").read_text())
    assert meta["format"] == "compressed" and meta["hyperparameters"]["learning_rate"] == 1e-3  # YAML's "1e-3"
    capsys.readouterr()
    config.write_text("sparsity: 0.5\nnot_an_option: 1\n")
    assert main(["prune", "--config", str(config)]) == 1
    assert "not_an_option" in capsys.readouterr().err


def _dataset_folder(tmp_path):
    """A local dataset with a train and a test split (datasets infers them from the file names)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, n in (("train", 8), ("test", 3)):
        rows = [{"text": f"{split} row {i}. " + TEXT[: 200 + 10 * i]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_dataset_splits_for_prune_and_eval(base, tmp_path, capsys):
    folder = _dataset_folder(tmp_path)
    out = tmp_path / "d"
    assert main(["prune", "--model_name_or_path", base, "--dataset_name", str(folder), "--dataset_split", "train",
                 "--eval_split", "test", *SMALL, "--output_dir", str(out), "--max_steps", "2",
                 "--admm_fraction", "0.5", *TRAIN]) == 0  # fmt: skip
    assert "8 training and 3 evaluation documents" in capsys.readouterr().out
    # eval: exactly the test split
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(folder), "--dataset_split", "test",
                 "--eval_seqlen", "16"]) == 0  # fmt: skip
    result = _last_json(capsys)
    test_docs = [json.loads(line)["text"] for line in (folder / "test.jsonl").read_text().splitlines()]
    ids = tokenize_documents(test_docs, make_char_tokenizer())
    assert result["tokens"] == ids.numel()
    model = load_sparse_model(out)
    assert math.isclose(result["perplexity"], perplexity(model, text=ids, seqlen=16), rel_tol=1e-5)
    # json data files, the builder from the extension; a config name that is a file is refused
    assert main(["eval", "--model_name_or_path", str(out), "--data_files", str(folder / "test.jsonl"),
                 "--eval_seqlen", "16"]) == 0  # fmt: skip
    assert _last_json(capsys)["tokens"] == ids.numel()
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", "json", "--dataset_config",
                 str(folder / "test.jsonl")]) == 1  # fmt: skip
    assert "--data_files" in capsys.readouterr().err
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(folder), "--dataset_split",
                 "validation"]) == 1  # fmt: skip
    assert "no split 'validation'" in capsys.readouterr().err


def test_one_shot_method_saves_masks_and_card(base, tmp_path, capsys):
    files = _files(tmp_path, 3)
    out = tmp_path / "w"
    assert main(["prune", "--model_name_or_path", base, "--text_files", *files, *SMALL, "--method", "wanda",
                 "--sparsity_type", "2:4", "--calibration_samples", "8", "--compressed", "--output_dir", str(out),
                 "--use_cpu", "--disable_tqdm", "true"]) == 0  # fmt: skip
    assert "wanda model saved" in capsys.readouterr().out
    model = load_sparse_model(out)
    assert abs(sparsity_report(model).sparsity - 0.5) < 1e-6
    meta = json.loads((out / "elsa_config.json").read_text())
    assert meta["method"] == "wanda" and meta["format"] == "compressed" and meta["sparsity_type"] == "2:4"
    assert meta["hyperparameters"]["calibration_samples"] == 8
    assert meta["evaluation"]["results"]["perplexity"] > 1
    assert (out / "tokenizer.json").is_file()


def test_prune_rejects_bad_field_before_loading(tmp_path, capsys):
    status = main(["prune", "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"),
                   "--sparsity", "1.5"])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert "ElsaConfig.sparsity=1.5" in err and "[0.0, 1.0)" in err


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan"])
def test_eval_fraction_out_of_range_names_the_flag(tmp_path, capsys, value):
    assert main(["prune", "--output_dir", str(tmp_path / "o"), "--eval_fraction", value]) == 1
    assert "--eval_fraction" in capsys.readouterr().err


def test_missing_folder_and_missing_tokenizer(base, tmp_path, capsys):
    assert main(["eval", "--model_name_or_path", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "folder not found" in err and "Repo id" not in err
    no_tok = tmp_path / "no_tok"
    make_model("llama").save_pretrained(no_tok)
    assert main(["eval", "--model_name_or_path", str(no_tok)]) == 1
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "sentencepiece" not in err


def test_inspect_malformed_folder_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(bad)]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert main(["inspect", str(tmp_path / "absent")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inspect_chart_has_a_bar_per_layer(tmp_path, capsys):
    from hf_elsa.oneshot import magnitude
    from hf_elsa.sparse_io import attach_sparsity

    model = make_model("llama")
    attach_sparsity(model, magnitude(model, sparsity=0.75), {"method": "magnitude", "sparsity": 0.75})
    model.save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--chart"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bars = [line for line in lines if line.startswith("model.layers.")]
    assert [b.split()[0] for b in bars] == ["model.layers.0", "model.layers.1"]
    assert all(b.endswith("75.00%") for b in bars)
    chart = layer_chart(sparsity_report(model), width=8)
    assert chart.splitlines()[1].count("#") + chart.splitlines()[1].count("\u2588") == 6  # 75% of 8


def test_help_lists_elsa_fields_first(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    groups = [
        out.index(title)
        for title in (
            "--config",
            "ElsaConfig options",
            "model options",
            "data options",
            "run options",
            "training options (transformers.TrainingArguments)",
        )
    ]
    assert groups == sorted(groups)
    for flag in (
        "--model_name_or_path",
        "--text_files",
        "--dataset_split",
        "--dataset_text_field",
        "--dtype",
        "--attn_implementation",
        "--compressed",
        "--method",
        "--data_files",
    ):
        assert flag in out, flag
    assert out.index("--sparsity ") < out.index("--learning_rate")


def test_unknown_option_for_inspect_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--bogus"])


def test_subcommands_are_a_table():
    assert {"prune", "eval", "inspect", "demo", "memory"} <= set(COMMANDS)
