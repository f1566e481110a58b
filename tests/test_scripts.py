"""hf_elsa.scripts (the argument set and the steps of ``hf-elsa prune``/``eval``) and hf_elsa.loading, piece by piece.

The whole runs are tested through the command (test_cli.py); here each part alone, with no model run.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_char_tokenizer, make_model

from hf_elsa import ElsaConfig, scripts
from hf_elsa.loading import check_model_source, check_tokenizer_source, load_model, load_tokenizer, looks_like_path
from hf_elsa.oneshot import PRUNERS
from hf_elsa.scripts import ElsaArgumentParser, ModelArguments, RunArguments, eval_windows

# -- loading (hf_elsa.loading, re-exported by scripts for compatibility) -----------------------------------------


def test_scripts_still_exports_the_loading_helpers():
    assert scripts.load_model is load_model and scripts.load_tokenizer is load_tokenizer
    assert scripts.check_model_source is check_model_source and scripts.looks_like_path is looks_like_path


@pytest.mark.parametrize(
    "name,path",
    [
        ("org/model", False),
        ("model", False),
        ("./model", True),
        ("/abs/m", True),
        ("a/b/c", True),
        ("~/m", True),
        ("m/", True),
    ],
)
def test_looks_like_path_tells_folders_from_hub_ids(name, path):
    assert looks_like_path(name) is path


def test_model_source_errors_name_the_flag_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model_name_or_path ./missing: folder not found"):
        check_model_source("./missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass the folder that holds config.json"):
        check_model_source(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_source(str(tmp_path))
    with pytest.raises(ValueError, match="--tokenizer_name_or_path .*has no tokenizer"):
        check_tokenizer_source(str(tmp_path), "--tokenizer_name_or_path")


def test_load_model_and_tokenizer_from_a_folder(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    make_char_tokenizer().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert load_tokenizer(str(tmp_path)).vocab_size == make_char_tokenizer().vocab_size


# -- the argument set ------------------------------------------------------------------------------------------


def test_model_arguments_build_the_from_pretrained_kwargs():
    args = ModelArguments(dtype="bfloat16", attn_implementation="sdpa", model_revision="v1", trust_remote_code=True)
    assert args.from_pretrained_kwargs() == {
        "dtype": torch.bfloat16,
        "attn_implementation": "sdpa",
        "revision": "v1",
        "trust_remote_code": True,
    }
    assert ModelArguments(dtype="auto").from_pretrained_kwargs() == {"dtype": "auto"}
    with pytest.raises(ValueError, match="--dtype 'float64': use one of"):
        ModelArguments(dtype="float64")


def test_run_arguments_take_elsa_or_any_registered_pruner():
    assert [RunArguments(method=m).method for m in ("elsa", *PRUNERS)] == ["elsa", *PRUNERS]
    with pytest.raises(ValueError, match=r"--method 'obs': use one of \('elsa', "):
        RunArguments(method="obs")


def test_the_parser_lists_the_methods_and_groups_the_trainer_options_last():
    parser = ElsaArgumentParser((ModelArguments, RunArguments, ElsaConfig))
    text = parser.format_help()
    assert "{elsa," + ",".join(PRUNERS) + "}" in text  # --method's choices, from the registry
    own, training = text.index("ElsaConfig options"), text.index("training options (transformers.TrainingArguments)")
    assert own < training and text.index("--sparsity ") < training < text.index("--learning_rate")


def test_the_parser_refuses_an_unknown_method_before_anything_loads(capsys):
    parser = ElsaArgumentParser((RunArguments,))
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--method", "obs"])
    assert "invalid choice: 'obs'" in capsys.readouterr().err


# -- evaluation windows ----------------------------------------------------------------------------------------


def _data(eval_seqlen=16, eval_windows=None):
    return SimpleNamespace(eval_seqlen=eval_seqlen, eval_windows=eval_windows)


def test_eval_windows_cut_the_text_into_whole_windows():
    held = eval_windows(torch.arange(100), _data(16))
    assert (held.seqlen, held.windows, held.note) == (16, 6, "")
    assert held.protocol("x") == "token perplexity on 6 non-overlapping 16-token windows of x"
    assert len(held.dataset()) == 6
    assert eval_windows(torch.arange(100), _data(16, eval_windows=2)).windows == 2
    assert eval_windows(torch.empty(0, dtype=torch.long), _data()) is None


def test_eval_windows_follow_the_models_positions_and_short_texts():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8))
    held = eval_windows(torch.arange(40), _data(16), model)
    assert held.seqlen == 8 and held.windows == 5 and "model's 8 positions" in held.note
    short = eval_windows(torch.arange(10), _data(16))
    assert (short.seqlen, short.windows) == (10, 1) and "one window" in short.note
    assert short.protocol("x") == "token perplexity on 1 non-overlapping 10-token window of x"
    with pytest.raises(ValueError, match="too few to score"):
        eval_windows(torch.arange(1), _data(16))
