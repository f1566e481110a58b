"""``--config run.yaml``: the values go through the same types and checks as the command line, and every bad file
is one short message naming the file, the line and the option -- never a traceback, never a huge message (issue 22).
"""

from __future__ import annotations

import time

import pytest

from hf_elsa._messages import MAX_CHARS, shorten
from hf_elsa.cli import _prune_parser, main
from hf_elsa.config import ElsaConfig
from hf_elsa.scripts import DataArguments, RunArguments


def _parse(tmp_path, text: str, *extra: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return _prune_parser().parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path / "o"), *extra])


def _outputs(tmp_path, text: str, *extra: str):
    parsed = _parse(tmp_path, text, *extra)
    return {type(o): o for o in parsed}


def _refused(tmp_path, text: str, *match: str) -> str:
    with pytest.raises(ValueError) as info:
        _parse(tmp_path, text)
    message = str(info.value)
    assert "run.yaml" in message, message
    for part in match:
        assert part in message, message
    return message


# -- the bomb --------------------------------------------------------------------------------------


def _bomb_under(key: str, levels: int = 7) -> str:
    """A YAML alias bomb as the value of ``key``: each level repeats the previous anchor 9 times, so the last
    element expands to 9 ** levels strings (cheap to load: the lists are shared, expensive to print)."""
    parts = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        parts.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return f"{key}: [" + ", ".join(parts) + "]\n"


def test_an_alias_bomb_under_an_option_is_refused_quickly(tmp_path):
    """The message names the option and stays short (it printed the whole expansion: 351 MB at 9 levels)."""
    start = time.perf_counter()
    message = _refused(tmp_path, _bomb_under("target_modules"), "target_modules")
    assert time.perf_counter() - start < 2
    assert len(message) < 600


def test_the_settings_check_shows_a_bounded_value():
    bomb: list = ["x"] * 9
    for _ in range(6):  # 9 ** 7 strings: its full repr takes seconds, the message must not
        bomb = [bomb] * 9
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules") as info:
        ElsaConfig(output_dir="/tmp/unused", target_modules=bomb)
    assert time.perf_counter() - start < 2
    assert len(str(info.value)) < 600


def test_shorten_is_bounded():
    bomb: list = ["x"] * 9
    for _ in range(12):
        bomb = [bomb] * 9
    assert len(shorten(bomb)) <= MAX_CHARS
    assert len(shorten("y" * 10**6)) <= MAX_CHARS
    assert shorten("doc.txt") == "'doc.txt'"
    assert shorten(10**5000).startswith("<int")


# -- the same types as the command line ------------------------------------------------------------


def test_a_float_for_an_int_option(tmp_path):
    _refused(tmp_path, "max_steps: 2.7\n", "max_steps", "2.7", "line 1")


def test_a_list_for_a_one_value_option(tmp_path):
    _refused(tmp_path, "sparsity: 0.5\nper_device_train_batch_size: [1, 2]\n", "per_device_train_batch_size", "line 2")


def test_a_mapping_for_a_number(tmp_path):
    _refused(tmp_path, "sparsity: {a: 1}\n", "sparsity", "line 1")


def test_a_nested_list_in_a_list_option(tmp_path):
    _refused(tmp_path, "target_modules: [[q_proj]]\n", "target_modules")


def test_one_text_file_as_a_string_is_a_list_of_one(tmp_path):
    data = _outputs(tmp_path, "text_files: doc.txt\n")[DataArguments]
    assert data.text_files == ["doc.txt"]


def test_values_are_typed_as_on_the_command_line(tmp_path):
    out = _outputs(
        tmp_path,
        "max_steps: 3\nlearning_rate: 1e-3\nsparsity: 0.6\nkeep_mask: yes\nsave_strategy: no\ncompressed: true\n"
        "target_modules: q_proj\nseed: '7'\n",
    )
    config = out[ElsaConfig]
    assert config.max_steps == 3 and config.learning_rate == 1e-3 and config.sparsity == 0.6
    assert config.keep_mask is True and config.seed == 7
    assert str(getattr(config.save_strategy, "value", config.save_strategy)) == "no"
    assert config.target_modules == ["q_proj"]
    assert out[RunArguments].compressed is True


def test_the_command_line_still_wins(tmp_path):
    config = _outputs(tmp_path, "max_steps: 3\n", "--max_steps", "5")[ElsaConfig]
    assert config.max_steps == 5


def test_a_choice_outside_the_choices(tmp_path):
    _refused(tmp_path, "sparsity_allocation: everywhere\n", "sparsity_allocation", "uniform")


def test_null_keeps_the_default(tmp_path):
    assert _outputs(tmp_path, "max_steps: null\n")[ElsaConfig].max_steps == -1


def test_a_no_option_reads_as_its_negation(tmp_path):
    """``--no_X`` names ``X`` set False: in YAML, ``no_X: true`` is ``X: false`` (not ``X: true``)."""
    parser = _prune_parser()
    negations = [a for a in parser._actions if a.nargs == 0 and a.option_strings[0].startswith("--no_")]
    if not negations:
        pytest.skip("no --no_ option in this transformers version")
    action = negations[0]
    name = action.option_strings[0][len("--no_") :]
    out = _parse(tmp_path, f"no_{name}: true\n")
    values = [getattr(o, action.dest) for o in out if hasattr(o, action.dest)]
    assert values == [False]


# -- malformed files -------------------------------------------------------------------------------


def test_a_duplicated_key_is_refused(tmp_path):
    _refused(tmp_path, "sparsity: 0.5\nmax_steps: 2\nsparsity: 0.9\n", "sparsity", "twice", "line 3", "line 1")


def test_a_duplicated_key_in_a_nested_mapping_is_refused(tmp_path):
    _refused(tmp_path, "model_init_kwargs: {revision: a, revision: b}\n", "revision", "twice")


def test_an_alias_to_the_same_key_is_refused(tmp_path):
    _refused(tmp_path, "block_size: 16\nmax_length: 32\n", "max_length", "twice")


def test_malformed_yaml(tmp_path):
    _refused(tmp_path, "sparsity: [0.5\nmax_steps: 2\n", "line")


def test_a_python_tag_is_refused_clearly(tmp_path):
    message = _refused(tmp_path, "output_dir: !!python/object/apply:os.getcwd []\n", "line 1", "!!python")
    assert "Traceback" not in message


def test_not_a_mapping(tmp_path):
    _refused(tmp_path, "- sparsity\n- 0.5\n", "mapping")


def test_not_utf8(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"sparsity: 0.5\n\x89PNG\xff\xfe\n")
    with pytest.raises(ValueError, match="run.yaml"):
        _prune_parser().parse_args_and_config(["--config", str(path)])


def test_deep_nesting_is_a_clear_error(tmp_path):
    _refused(tmp_path, "model_init_kwargs: " + "[" * 5000 + "]" * 5000 + "\n", "deep")


def test_the_command_prints_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 2.7\n")
    assert main(["prune", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_steps" in err and "run.yaml" in err
