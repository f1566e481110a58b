"""Sparsity metadata in config.json and elsa_config.json; unknown keys (hf_elsa.sparse_io.metadata)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest

import hf_elsa
from hf_elsa import load_sparse_model, sparse_io
from hf_elsa.sparse_io import ELSA_CONFIG_NAME, MASKS_NAME
from hf_elsa.targets import find_prunable_modules

from .helpers import pruned_model


def test_metadata_in_config_elsa_config_and_model_card(tmp_path):
    evaluation = {"protocol": "word perplexity, 512-token windows", "results": {"wiki ppl": 31.5}}
    model = pruned_model("gpt2", metadata={"base_model": "openai-community/gpt2", "evaluation": evaluation})
    model.save_pretrained(tmp_path / "m")

    entry = json.loads((tmp_path / "m" / "config.json").read_text())["elsa_sparsity"]
    assert entry["method"] == "magnitude" and entry["sparsity"] == 0.9 and entry["sparsity_type"] == "unstructured"
    assert entry["hf_elsa_version"] == hf_elsa.__version__ and entry["format"] == "dense"
    assert set(entry["tensors"]) == {f"{n}.weight" for n in find_prunable_modules(model)}
    assert all(0.89 < s < 0.91 for s in entry["tensors"].values())
    assert "target_modules" in entry

    meta = json.loads((tmp_path / "m" / ELSA_CONFIG_NAME).read_text())
    assert meta["elsa_format_version"] == sparse_io.FORMAT_VERSION
    assert meta["save_id"] == entry["save_id"]
    assert set(meta["files"]) == {"model.safetensors", MASKS_NAME, "config.json"}  # config.json is checksummed too

    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert (
        card.data.library_name == "transformers" and "hf_elsa" in card.data.tags
    )  # dense: plain transformers loads it
    assert {"elsa", "sparse", "pruned"} <= set(card.data.tags)
    assert card.data.base_model == "openai-community/gpt2"
    assert "word perplexity, 512-token windows" in card.text and "31.5" in card.text
    assert "transformer.h.0.attn.c_attn.weight" in card.text and "magnitude" in card.text


def test_unknown_keys_are_tolerated_and_kept(tmp_path, caplog):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / ELSA_CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["from_the_future"] = {"x": 1}
    path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="hf_elsa.sparse_io"):
        loaded = load_sparse_model(tmp_path / "m")
    assert "from_the_future" in caplog.text
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / ELSA_CONFIG_NAME).read_text())["from_the_future"] == {"x": 1}

    meta["elsa_format_version"] = sparse_io.FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="newer"):
        load_sparse_model(tmp_path / "m")


# -- malformed metadata: one ValueError naming the file and the key, never a traceback from deep inside ----------


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "m"
    pruned_model().save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "m")
    return tmp_path / "m"


GOOD_FILE = {"bytes": 10, "sha256": "0" * 64}
W = "model.layers.0.mlp.up_proj.weight"
# (what elsa_config.json becomes, the key the error must name)
BAD_ELSA_CONFIGS = [
    (lambda m: [m], None),
    (lambda m: "elsa", None),
    (lambda m: 42, None),
    (lambda m: {**m, "extra": 5}, "extra"),
    (lambda m: {**m, "extra": [1]}, "extra"),
    (lambda m: {**m, "hyperparameters": "lr=1"}, "hyperparameters"),
    (lambda m: {**m, "hyperparameters": [1, 2]}, "hyperparameters"),
    (lambda m: {**m, "hyperparameters": None}, "hyperparameters"),
    (lambda m: {**m, "fine_tuning": 3}, "fine_tuning"),
    (lambda m: {**m, "evaluation": "good"}, "evaluation"),
    (lambda m: {**m, "evaluation": {"results": [1]}}, "evaluation['results']"),
    (lambda m: {**m, "evaluation": {"results": {"ppl": [1]}}}, "evaluation['results']['ppl']"),
    (lambda m: {**m, "evaluation": {"protocol": 7}}, "evaluation['protocol']"),
    (lambda m: {**m, "sparsity": "0.9"}, "sparsity"),
    (lambda m: {**m, "sparsity": 1.5}, "sparsity"),
    (lambda m: {**m, "sparsity": True}, "sparsity"),
    (lambda m: {**m, "achieved_sparsity": "x"}, "achieved_sparsity"),
    (lambda m: {**m, "elsa_format_version": "2"}, "elsa_format_version"),
    (lambda m: {**m, "elsa_format_version": 0}, "elsa_format_version"),
    (lambda m: {**m, "hf_elsa_version": None}, "hf_elsa_version"),
    (lambda m: {**m, "format": 3}, "format"),
    (lambda m: {**m, "format": "zip"}, "format"),
    (lambda m: {**m, "method": 5}, "method"),
    (lambda m: {**m, "sparsity_type": ["2:4"]}, "sparsity_type"),
    (lambda m: {**m, "target_modules": 5}, "target_modules"),
    (lambda m: {**m, "target_modules": [1]}, "target_modules"),
    (lambda m: {**m, "base_model": ["a"]}, "base_model"),
    (lambda m: {**m, "save_id": 5}, "save_id"),
    (lambda m: {**m, "tensors": []}, "tensors"),
    (lambda m: {**m, "tensors": {W: 5}}, f"tensors['{W}']"),
    (lambda m: {**m, "tensors": {W: {"shape": "abc", "sparsity": 0.9}}}, f"tensors['{W}']['shape']"),
    (lambda m: {**m, "tensors": {W: {"shape": [-1], "sparsity": 0.9}}}, f"tensors['{W}']['shape']"),
    (lambda m: {**m, "tensors": {W: {"shape": [2], "sparsity": 0.9, "zeros": "x"}}}, f"tensors['{W}']['zeros']"),
    (lambda m: {**m, "tensors": {W: {"sparsity": 0.9}}}, f"tensors['{W}']['shape']"),
    (lambda m: {**m, "files": "model.safetensors"}, "files"),
    (lambda m: {**m, "files": {"model.safetensors": "abc"}}, "files['model.safetensors']"),
    (
        lambda m: {**m, "files": {"model.safetensors": {**GOOD_FILE, "bytes": "10"}}},
        "files['model.safetensors']['bytes']",
    ),
    (
        lambda m: {**m, "files": {"model.safetensors": {**GOOD_FILE, "sha256": "xyz"}}},
        "files['model.safetensors']['sha256']",
    ),
    (lambda m: {**m, "files": {"model.safetensors": {"bytes": 10}}}, "files['model.safetensors']['sha256']"),
    (lambda m: {**m, "files": {"../../etc/passwd": GOOD_FILE}}, "files['../../etc/passwd']"),
    (lambda m: {**m, "files": {"/etc/passwd": GOOD_FILE}}, "files['/etc/passwd']"),
    (lambda m: {**m, "files": {"a/../../b": GOOD_FILE}}, "files['a/../../b']"),
    (lambda m: {**m, "files": {"C:\\\\x": GOOD_FILE}}, "files['C:"),
]


@pytest.mark.parametrize("mutate, key", BAD_ELSA_CONFIGS)
def test_malformed_elsa_config_is_a_value_error_naming_file_and_key(mutate, key, saved_folder, tmp_path):
    folder = _copy(saved_folder, tmp_path)
    path = folder / ELSA_CONFIG_NAME
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    for verify in (True, False):
        with pytest.raises(ValueError) as err:
            load_sparse_model(folder, verify=verify)
        message = str(err.value)
        assert ELSA_CONFIG_NAME in message, message
        assert key is None or key in message, message
        assert "JSON object" in message or key is not None


BAD_CONFIG_JSONS = [
    (lambda c: [c], None),
    (lambda c: "config", None),
    (lambda c: {**c, "elsa_sparsity": "x"}, "elsa_sparsity"),
    (lambda c: {**c, "elsa_sparsity": [1]}, "elsa_sparsity"),
    (lambda c: {**c, "elsa_sparsity": 5}, "elsa_sparsity"),
    (lambda c: {**c, "elsa_sparsity": {**c["elsa_sparsity"], "save_id": 5}}, "elsa_sparsity['save_id']"),
    (lambda c: {**c, "elsa_sparsity": {**c["elsa_sparsity"], "format": ["dense"]}}, "elsa_sparsity['format']"),
]


@pytest.mark.parametrize("mutate, key", BAD_CONFIG_JSONS)
def test_malformed_elsa_sparsity_in_config_json_is_a_value_error_naming_file_and_key(
    mutate, key, saved_folder, tmp_path
):
    folder = _copy(saved_folder, tmp_path)
    path = folder / "config.json"
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    with pytest.raises(ValueError) as err:
        load_sparse_model(folder)
    message = str(err.value)
    assert "config.json" in message and (key is None or key in message), message


@pytest.mark.parametrize(
    "metadata, key",
    [
        ({"sparsity": "high"}, "sparsity"),
        ({"evaluation": [1]}, "evaluation"),
        ({"hyperparameters": 3}, "hyperparameters"),
    ],
)
def test_attach_sparsity_checks_metadata_types_too(metadata, key):
    with pytest.raises(ValueError, match=rf"attach_sparsity\(metadata=\.\.\.\): key {key}"):
        pruned_model(metadata=metadata)
