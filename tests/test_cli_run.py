"""What `hf-elsa prune` leaves and prints: the model only, in its own dtype, scored beside the dense model; TRL's
config names on the command line; `hf-elsa eval` saying what it scored (tiny model, offline)."""

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_char_tokenizer, make_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_elsa import perplexity
from hf_elsa.cli import main
from hf_elsa.data import split_text

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
# no --save_strategy: the command's own default is under test
RUN = ["--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
       "--admm_interval", "1", "--eval_seqlen", "16", "--eval_windows", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    """A tiny Llama saved in bfloat16, as most Hub checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16_base")
    make_model("llama").to(torch.bfloat16).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


def _files(tmp_path, n=6):
    paths = []
    for i in range(n):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"Document {i}. " + TEXT)
        paths.append(str(path))
    return paths


def _weight_dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def test_output_folder_is_the_model_only_in_the_dtype_it_came_in(bf16_base, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model_name_or_path", str(bf16_base), "--text_files", *_files(tmp_path), "--max_length",
                 "16", "--output_dir", str(out), "--sparsity", "0.5", "--max_steps", "4", "--save_steps", "2",
                 *RUN]) == 0  # fmt: skip
    assert "(bfloat16 weights)" in capsys.readouterr().out
    assert not [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]  # no optimizer state
    assert _weight_dtypes(out) == {"BF16"}  # trained in float32 master weights, shipped as it came
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert model.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj.weight
    assert int((q == 0).sum()) == q.numel() // 2  # exactly sparse after the cast
    # checkpoints when asked for; --save_dtype picks the saved dtype
    asked = tmp_path / "asked"
    assert main(["prune", "--model_name_or_path", str(bf16_base), "--text_files", *_files(tmp_path), "--max_length",
                 "16", "--output_dir", str(asked), "--sparsity", "0.5", "--max_steps", "4", "--save_strategy",
                 "steps", "--save_steps", "2", "--save_dtype", "float32", *RUN]) == 0  # fmt: skip
    assert (asked / "checkpoint-4").is_dir() and _weight_dtypes(asked) == {"F32"}


def test_card_names_the_base_model_a_folder_records(tmp_path, capsys):
    """A local folder has no Hub id; its README (or elsa_config.json) may name the model it holds."""
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    files = _files(tmp_path)
    common = ["prune", "--model_name_or_path", str(base), "--text_files", *files, "--block_size", "16", "--method",
              "magnitude", "--sparsity", "0.5", *RUN]  # fmt: skip
    assert main([*common, "--output_dir", str(tmp_path / "anonymous")]) == 0
    card = huggingface_hub.ModelCard.load(tmp_path / "anonymous" / "README.md")
    assert card.data.base_model is None and card.text.split("\n")[2].startswith("# A causal LM pruned with magnitude")
    (base / "README.md").write_text("---\nbase_model: org/tiny-llama\n---\n\nA tiny Llama.\n")
    assert main([*common, "--output_dir", str(tmp_path / "named")]) == 0
    card = huggingface_hub.ModelCard.load(tmp_path / "named" / "README.md")
    assert card.data.base_model == "org/tiny-llama" and "# tiny-llama, pruned (50.0% sparse)" in card.text
    assert "pypi.org" not in card.text  # no link to a package page that does not exist


def test_dense_perplexity_on_the_same_windows_printed_and_recorded(tmp_path, capsys):
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    tokenizer = make_char_tokenizer()
    tokenizer.save_pretrained(base)
    files = _files(tmp_path)
    out = tmp_path / "magnitude"
    assert main(["prune", "--model_name_or_path", str(base), "--text_files", *files, "--block_size", "16",
                 "--method", "magnitude", "--output_dir", str(out), "--sparsity", "0.5", *RUN]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads((out / "elsa_config.json").read_text())["evaluation"]["results"]
    # the dense model, scored on the same held-out windows as the pruned one
    held = split_text([Path(f).read_text() for f in files], tokenizer, eval_fraction=0.1, seed=0).eval
    dense = perplexity(make_model("llama"), text=held, seqlen=16, max_windows=2)
    assert math.isclose(results["dense_perplexity"], dense, rel_tol=1e-4)
    assert results["perplexity"] != results["dense_perplexity"]  # two models scored, not one number twice
    assert f"dense {dense:.2f} on the same windows" in printed
    # the card: dense beside pruned, what the model was trained on, the dense score not claimed as this model's
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert f"| perplexity | {results['dense_perplexity']} | {results['perplexity']} |" in card.text
    assert "## Training data\n\n6 text file(s); 1 of 6 documents held out (seed 0)" in card.text
    assert [r.metric_type for r in card.data.eval_results] == ["perplexity"]
    assert json.loads((out / "elsa_config.json").read_text())["hyperparameters"]["block_size"] == 16


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_trl_names_on_the_command_line(tmp_path, capsys):
    """--max_length (alias --block_size) and --dataset_text_field are ElsaConfig's; CLI-only limits are named."""
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"body": f"row {i}. " + TEXT[: 200 + 10 * i]} for i in range(8)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    common = ["prune", "--model_name_or_path", str(base), "--data_files", str(folder / "train.jsonl"),
              "--output_dir", str(out), "--max_steps", "2", "--admm_fraction", "0.5", *RUN]  # fmt: skip
    assert main([*common, "--dataset_text_field", "body", "--max_length", "16"]) == 0
    assert "8 document(s)" in capsys.readouterr().out or (out / "elsa_config.json").is_file()
    assert main([*common, "--max_length", "16"]) == 1  # the default column 'text' is not there
    assert "no column 'text'" in capsys.readouterr().err
    assert main([*common, "--dataset_text_field", "body", "--packing", "false"]) == 1
    assert "ElsaConfig(packing=False)" in capsys.readouterr().err
    assert main([*common, "--dataset_text_field", "body", "--model_init_kwargs", '{"dtype": "bfloat16"}']) == 1
    assert "--dtype" in capsys.readouterr().err


def test_eval_says_what_it_scored(tmp_path, capsys):
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    make_char_tokenizer().save_pretrained(base)
    files = _files(tmp_path, 2)
    assert main(["eval", "--model_name_or_path", str(base), "--text_files", *files, "--eval_seqlen", "16"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["scored"].startswith(f"token perplexity on {result['windows']} non-overlapping 16-token windows")
    assert "none held back" in captured.err and "trained on is scored too" in captured.err


def test_prune_under_a_launcher_prints_once_and_refuses_one_shot(tmp_path, capsys, monkeypatch):
    """`accelerate launch -m hf_elsa prune` runs one process per GPU: only the main one prints the summary, and a
    one-shot method (which every process would run and save) is refused before any model load."""
    import hf_elsa.scripts
    from hf_elsa import ElsaConfig
    from hf_elsa.scripts import PruneResult

    done = PruneResult(str(tmp_path), "elsa", 20.45, "protocol", ["data: x"], 9.97, "bfloat16")
    monkeypatch.setattr(hf_elsa.scripts, "run_prune", lambda *args: done)
    monkeypatch.setattr(ElsaConfig, "process_index", property(lambda self: 1))
    assert main(["prune", "--output_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(ElsaConfig, "process_index", property(lambda self: 0))
    assert main(["prune", "--output_dir", str(tmp_path)]) == 0
    assert "held-out perplexity 20.45, dense 9.97 on the same windows" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setattr(ElsaConfig, "world_size", property(lambda self: 2))
    assert main(["prune", "--method", "wanda", "--output_dir", str(tmp_path / "w")]) == 1
    assert "one-shot pruning runs on one process" in capsys.readouterr().err


def test_prune_help_documents_several_processes(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "accelerate launch --num_processes N -m hf_elsa prune" in out and "torchrun --nproc_per_node N" in out
    assert "(default: no)" in out.split("  --save_strategy {", 1)[1].split("  --", 1)[0]  # the model-only folder
